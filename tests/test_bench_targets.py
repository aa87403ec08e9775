"""kvlib.bench.targets: each target judged from the numbers, with its limit from one table."""

import pytest

from kvlib.bench.targets import TARGETS, Target, lockstep_targets, targets


def test_targets_are_judged_from_the_numbers(synthetic_results):
    data = synthetic_results(
        {("prealloc", 200): 1.1},
        {("concat", 200): 30, ("prealloc", 200): 37, ("hf-dynamic", 200): 30,
         ("prealloc", 1000): 30, ("hf-dynamic", 1000): 25, ("concat", 1000): 20})
    got = [(round(t["value"], 3), t["met"]) for t in targets(data)]
    assert got == [(1.233, True),  # 200 tokens: fastest cache (prealloc) vs DynamicCache
                   (1.1, True),  # its step vs the floor
                   (1.2, False),  # 1000 tokens: prealloc vs DynamicCache, needs 1.3
                   (1.1, True),  # step at the end vs floor + KV
                   (1.1, True),  # flat: last 100 / first 100
                   (2.0, True)]  # concat's growth, shown
    assert targets(data)[0]["detail"] == "prealloc"
    # nothing measured: "not measured", never a pass
    empty = targets({"results": [], "environment": {"threads": 2}, "floor": []})
    assert all(t["met"] is None for t in empty)


def _lockstep_run(n: int, **medians: float) -> dict:
    return {"new_tokens": n, **{k: {"median": v} for k, v in medians.items()}}


def _lockstep() -> dict:
    return {"strategy": "prealloc", "runs": [
        _lockstep_run(200, kvlib_over_hf_tokens_per_s=1.21, step_over_floor=1.19),
        _lockstep_run(1000, kvlib_over_hf_tokens_per_s=1.28, flatness_per_floor=1.1)]}


def test_lockstep_targets_are_judged_from_the_numbers():
    d = _lockstep()
    got = [(t["value"], t["met"]) for t in lockstep_targets(d)]
    assert got == [(1.21, True), (1.19, False), (1.28, False), (1.1, True)]
    assert all("lockstep" in t["target"] for t in lockstep_targets(d))
    d["runs"] = d["runs"][:1]  # no 1000-token run: not measured, never a pass
    assert [t["met"] for t in lockstep_targets(d)][2:] == [None, None]


def test_gpt2s_compiled_decoding_is_judged_when_the_lockstep_ran_it():
    d = _lockstep()
    assert not any("compiled" in t["target"] for t in lockstep_targets(d))
    d["compiled"] = True
    d["runs"][0].update(compiled_over_hf_tokens_per_s={"median": 1.33},
                        compiled_over_floor={"median": 1.12})
    rows = lockstep_targets(d)[4:]
    assert [(t["value"], t["limit"], t["met"]) for t in rows] == [(1.33, 1.2, True),
                                                                  (1.12, 1.15, True)]
    assert all("compiled" in t["target"] for t in rows)


def test_a_small_models_lockstep_is_judged_eager_and_compiled():
    d = {"model": "mini-llama", "strategy": "prealloc", "environment": {"threads": 2},
         "runs": [_lockstep_run(200, kvlib_over_hf_tokens_per_s=1.2, step_over_floor=2.1,
                                compiled_over_hf_tokens_per_s=1.7, compiled_over_floor=1.45)]}
    rows = lockstep_targets(d)
    assert [(t["value"], t["limit"], t["met"]) for t in rows] == [
        (1.2, 1.5, False), (2.1, 1.5, False), (1.7, 1.5, True), (1.45, 1.5, True)]
    assert all(t["target"].startswith("mini-llama, 2 thread(s), 200 tokens") for t in rows)
    d["environment"]["cpu_model"] = "AMD EPYC"  # the machine type, in every row's name
    assert all("lockstep (AMD EPYC):" in t["target"] for t in lockstep_targets(d))
    del d["runs"][0]["compiled_over_floor"]  # compiled decoding did not run: never a pass
    assert lockstep_targets(d)[3]["met"] is None


def test_one_table_of_limits_for_both_judges(synthetic_results, monkeypatch):
    data = synthetic_results({("prealloc", 200): 1.1},
                             {("prealloc", 200): 37, ("hf-dynamic", 200): 30})
    judged = [t for t in targets(data) + lockstep_targets(_lockstep()) if t["op"] != "shown"]
    others = ("qwen3", "bf16", "sinks", "engine", "paged", "int8", "int4", "mini")  # other commands
    gpt2 = [k for k in TARGETS if not k.startswith(others)]  # the gpt2 run's own targets
    limits = {(TARGETS[k].op, TARGETS[k].limit) for k in gpt2}
    assert {(t["op"], t["limit"]) for t in judged} == limits  # every limit from the table
    # one edit of the table moves both: the run's row and the lockstep's row
    monkeypatch.setitem(TARGETS, "faster_than_hf_200", Target(200, ">=", 1.25))
    run_row, lockstep_row = targets(data)[0], lockstep_targets(_lockstep())[0]
    assert run_row["limit"] == lockstep_row["limit"] == 1.25
    assert run_row["met"] is False and lockstep_row["met"] is False  # 1.233 and 1.21



def _row(model: str, dtype: str, strategy: str, step_ms: float, floor_ratio: float,
         tokens: list[int]) -> dict:
    return {"model": model, "dtype": dtype, "batch": 1, "device": "cpu", "new_tokens": 200,
            "strategy": strategy, "backend": "hf" if strategy.startswith("hf") else "kvlib",
            "decode_tokens_per_s": {"median": 1000 / step_ms}, "step_ms": {"p50": step_ms},
            "floor_ratio": floor_ratio, "tokens": tokens}


def test_qwen3_and_bfloat16_targets():
    res = [_row("qwen3-0.6b", "float32", "prealloc", 150.0, 1.07, [1, 2, 3]),
           _row("qwen3-0.6b", "float32", "concat", 151.0, 1.08, [1, 2, 3]),
           _row("qwen3-0.6b", "float32", "hf-dynamic", 160.0, 1.14, [1, 2, 3]),
           _row("qwen3-0.6b", "bfloat16", "prealloc", 100.0, 1.2, [1, 2, 4]),
           _row("gpt2", "bfloat16", "prealloc", 20.0, 1.1, [5, 6])]
    rows = targets({"results": res, "environment": {"threads": 2}})
    near, fast = (t for t in rows if t["target"].startswith("Qwen3"))
    assert near["value"] == 1.07 and near["met"] is True and near["detail"] == "prealloc"
    assert fast["value"] == pytest.approx(160 / 150) and fast["met"] is True
    bf16 = [t for t in rows if "bfloat16" in t["target"]]
    assert [t["target"].split(",")[0] for t in bf16] == ["gpt2", "qwen3-0.6b"]
    assert bf16[0]["met"] is None  # gpt2 has no float32 run here: not measured, never a pass
    assert bf16[1]["value"] == pytest.approx(100 / 150) and bf16[1]["met"] is True
    assert bf16[1]["detail"] == "greedy tokens equal for 2 of 3, then differ"
