"""kvlib.bench.run: what one small run (the ``bench_run`` fixture) writes: the schema, the
floors, the no-cache points, the overhead section and the cache bytes each strategy held."""

import json

import pytest

import kvlib
from kvlib.bench import HF_KINDS, SCHEMA, alloc_steps, floor_nbytes
from kvlib.bench.overhead import GAP_PARTS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_json_schema(bench_run, make_model):
    _, s, data = bench_run
    N, LENGTHS = s["new_tokens"], s["lengths"]
    assert data["schema"] == SCHEMA
    assert data["command"].startswith("python -m kvlib.bench run --models tiny")
    for key, kind in {"torch": str, "python": str, "cpu_model": str, "cpu_count": int,
                      "threads": int, "device": str, "transformers": str}.items():
        assert isinstance(data["environment"][key], kind), key
    assert data["environment"]["threads"] == 1
    assert isinstance(data["duration_s"], float) and data["duration_s"] > 0
    assert sorted(r["strategy"] for r in data["results"]) == sorted(s["strategies"] + list(
        HF_KINDS))
    for r in data["results"]:
        assert (r["model"], r["new_tokens"], r["batch"], r["dtype"], r["device"], r["repeats"]) \
            == ("tiny", N, 1, "float32", "cpu", 2)
        assert r["backend"] == ("hf" if r["strategy"].startswith("hf-") else "kvlib")
        for key in ("prefill_ms", "decode_tokens_per_s", "e2e_tokens_per_s", "wall_s"):
            assert set(r[key]) == {"median", "q1", "q3", "min", "max", "n"}, key
            assert r[key]["min"] <= r[key]["median"] <= r[key]["max"], key
        assert {"p50", "p90", "p99"} <= set(r["step_ms"])
        assert r["step_ms"]["p50"] <= r["step_ms"]["p90"] <= r["step_ms"]["p99"]
        assert len(r["step_curve_ms"]) == N - 1 and all(x > 0 for x in r["step_curve_ms"])
        assert r["floor_ratio"] > 0 and isinstance(r["cache_nbytes"], int)
        assert [a["seq_len"] for a in r["allocations"]] == [6 + s for s in alloc_steps(N)]
        assert len(r["allocations"]) == 2
        assert all(a["count"] > 0 and a["bytes"] > 0 for a in r["allocations"])
    for f in data["floor"]:
        assert f["weight_nbytes"] == floor_nbytes(make_model("tiny")) and f["ms"]["n"] >= 4
    assert {f["kv_len"] for f in data["floor"]} == {0, 6 + N}
    assert [x["length"] for x in data["no_cache"]] == list(LENGTHS)
    assert all(x["no_cache_ms"]["n"] == 3 for x in data["no_cache"])
    assert data["no_cache"][0]["cached_ms"] > 0  # length 16 lies inside the 18-token run
    assert data["no_cache"][1]["cached_ms"] is None  # 32 does not: no made-up number
    json.dumps(data, allow_nan=True)  # plain JSON types only


def test_overhead_section(bench_run):
    ov = bench_run[2]["overhead"]
    assert set(ov["twin_step_ms"]) == {"concat", "prealloc", "sliding", *HF_KINDS}
    assert ov["profile"]["top"] and ov["profile"]["wall_ms"] > 0
    gap = ov["gap"]
    assert gap["same_logits"] and gap["ops_per_step"]["layernorm"] == 2 * 2 + 1  # tiny: 2 layers
    assert list(gap["ms"]) == ["kvlib step (modules)", "bare functional step",
                               *(f"without {p}" for p in GAP_PARTS),
                               "matrix products only", "floor"]
    assert all(v > 0 for v in gap["ms"].values())


def test_cache_bytes_held(bench_run):
    _, s, data = bench_run
    N, WINDOW = s["new_tokens"], s["window"]
    cfg = kvlib.GPTConfig.from_preset("tiny")
    per_token = cfg.n_layers * 2 * cfg.n_heads * cfg.head_dim * 4  # K and V, float32, batch 1
    held = {r["strategy"]: r["cache_nbytes"] for r in data["results"]}
    # N tokens: the prompt (6) and N - 1 decoded tokens went through the cache
    assert held == {"none": 0, "concat": (6 + N - 1) * per_token, "prealloc": (6 + N) * per_token,
                    "sliding": WINDOW * per_token, "hf-dynamic": (6 + N - 1) * per_token,
                    "hf-static": (6 + N) * per_token}
