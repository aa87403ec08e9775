"""kvlib.bench.lockstep: kvlib, DynamicCache and the floor take one decode step each, in turn."""

import json

import pytest

from kvlib.bench import SCHEMA, lockstep_summary, main, report

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_lockstep_runs_the_three_in_turn(tmp_path, run_like_data):
    out = tmp_path / "lockstep.json"
    main(["lockstep", "--model", "tiny", "--new-tokens", "8", "--repeats", "2",
          "--threads", "0", "--no-progress", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["schema"] == SCHEMA + "/lockstep" and d["command"].startswith(
        "python -m kvlib.bench lockstep --model tiny")
    (r,) = d["runs"]
    assert r["new_tokens"] == 8 and len(r["repeats"]) == 2
    assert r["same_tokens"] is True  # kvlib's prealloc and DynamicCache: the same greedy tokens
    for rep in r["repeats"]:
        assert len(rep["kvlib_ms"]) == len(rep["hf_ms"]) == len(rep["floor_ms"]) == 7
        assert sorted(rep["order"]) == ["floor", "hf", "kvlib"]
    assert [rep["order"][0] for rep in r["repeats"]] == ["kvlib", "hf"]  # rotated per repeat
    for key in ("kvlib_over_hf_tokens_per_s", "step_over_floor", "flatness"):
        assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"], key
    data = {**run_like_data(), "lockstep": d}
    text = report(data)
    assert "## Lockstep" in text and "| 8 | 2 |" in text and d["command"] in text


def test_compiled_decoding_takes_a_fourth_turn(tmp_path, run_like_data):
    out = tmp_path / "lockstep.json"
    main(["lockstep", "--model", "tiny-llama", "--new-tokens", "6", "--repeats", "2",
          "--threads", "0", "--compile", "--no-progress", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["compiled"] is True and d["compile_s"] > 0
    (r,) = d["runs"]
    assert r["same_tokens"] is True  # eager, compiled and DynamicCache: the same greedy tokens
    for rep in r["repeats"]:
        assert len(rep["compiled_ms"]) == len(rep["kvlib_ms"]) == 5
        assert sorted(rep["order"]) == ["compiled", "floor", "hf", "kvlib"]
    assert 0 < r["compiled_over_floor"]["median"] and 0 < r["compiled_over_hf_tokens_per_s"][
        "median"]
    text = report({**run_like_data(), "lockstep": [d]})
    assert "## Lockstep: tiny-llama" in text and "compiled step / floor" in text
    assert "tiny-llama, 1 thread(s), 6 tokens" not in text  # judged at 200 tokens: not measured
    cpu = d["environment"]["cpu_model"]
    assert (f"tiny-llama, 1 thread(s), 200 tokens, lockstep ({cpu}): prealloc compiled median "
            "decode step / floor | n/ax | <= 1.5 | not measured |") in text


def test_the_aot_step_takes_a_turn_too(tmp_path, run_like_data):
    out = tmp_path / "lockstep.json"
    main(["lockstep", "--model", "tiny-llama", "--new-tokens", "6", "--repeats", "2",
          "--threads", "0", "--aot", "--no-progress", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["aot"] is True and d["compiled"] is False and d["aot_compile_s"] > 0
    (r,) = d["runs"]
    assert r["same_tokens"] is True  # eager, AOT-compiled and DynamicCache: the same tokens
    for rep in r["repeats"]:
        assert len(rep["aot_ms"]) == len(rep["kvlib_ms"]) == 5
        assert sorted(rep["order"]) == ["aot", "floor", "hf", "kvlib"]
    assert 0 < r["aot_over_floor"]["median"] and 0 < r["aot_over_hf_tokens_per_s"]["median"]
    text = report({**run_like_data(), "lockstep": [d]})
    assert "aot step / floor" in text and "making it took" in text
    cpu = d["environment"]["cpu_model"]
    assert (f"tiny-llama, 1 thread(s), 200 tokens, lockstep ({cpu}): prealloc AOT-compiled "
            "median decode step / floor | n/ax | <= 1.5 | not measured |") in text


def test_lockstep_summary_cancels_drift_per_floor_step():
    drift = [1 + i / 100 for i in range(300)]  # the machine slows by 3x over the run
    rep = {"kvlib_ms": [2 * d for d in drift], "hf_ms": [3 * d for d in drift],
           "floor_ms": drift, "same_tokens": True}
    s = lockstep_summary([rep])
    assert s["kvlib_over_hf_tokens_per_s"]["median"] == pytest.approx(1.5)
    assert s["step_over_floor"]["median"] == pytest.approx(2.0)
    assert s["flatness"]["median"] > 2  # raw: the drift shows up as growth
    assert s["flatness_per_floor"]["median"] == pytest.approx(1.0)  # per floor step: flat
