"""kvlib.bench.report and kvlib.bench.figures: RESULTS.md, the PNGs and the run's summary table,
all from the JSON."""

import json
import re
import shlex
from pathlib import Path

import pytest

from kvlib.bench import PLOTS, compile_text, main, report
from kvlib.bench.report import summary_table


def test_report_and_plots(bench_run, capsys):
    out, _, data = bench_run
    text = report(data, str(out))
    for needle in ("## Targets", "## Decode speed", "## Floor and floor + KV",
                   "## Cache vs no cache, per step", "## Per-step overhead", "hf-static",
                   "## Where the time above the floor goes", "| without gelu |",
                   "No GPU on this machine", data["command"], "![Decode step latency"):
        assert needle in text, needle
    for name, _ in PLOTS:
        png = out / name
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000, name
    argv = ["report", str(out / "results.json"), "--plots-dir", str(out)]
    main(argv)
    command = shlex.join(["python", "-m", "kvlib.bench", *argv]) + " > benchmarks/RESULTS.md"
    assert capsys.readouterr().out.strip() == report({**data, "report_command": command},
                                                     str(out)).strip()


def test_report_names_strategies_for_a_reader(bench_run):
    text = report(bench_run[2])
    assert "| no cache |" in text and "| none |" not in text
    assert "| sliding (window 8) |" in text


def test_summary_table_has_a_row_per_result(bench_run):
    data = bench_run[2]
    lines = summary_table(data).splitlines()
    assert lines[0].split("  ")[0] == "model" and set(lines[1]) == {"-", " "}
    for column in ("strategy", "decode tok/s", "step / floor", "cache held"):
        assert column in lines[0], column
    assert len(lines) == 2 + len(data["results"])
    width = len(lines[1])
    assert all(len(line) <= width for line in lines)  # aligned columns
    rows = {r["strategy"]: r for r in data["results"]}
    prealloc = next(line for line in lines if " prealloc " in line)
    assert f"{rows['prealloc']['decode_tokens_per_s']['median']:.1f}" in prealloc
    assert f"{rows['prealloc']['floor_ratio']:.2f}" in prealloc
    assert f"{rows['prealloc']['cache_nbytes'] / 1024:.1f} KiB" in prealloc
    assert next(line for line in lines if " no cache " in line).endswith(" 0 B")


def test_compile_verdict_follows_the_numbers():
    def record(eager: float, compiled: float) -> dict:
        ms = lambda m: {"median": m, "q1": m, "q3": m}  # noqa: E731
        return {"model": "gpt2", "new_tokens": 100, "threads": 2, "first_run_s": 240.0,
                "eager_step_ms": ms(eager), "compiled_step_ms": ms(compiled), "same_tokens": True}

    assert "does not pay" in compile_text(record(31.0, 30.5))
    assert "leave `compile=False`" in compile_text(record(31.0, 32.0))
    assert "pays off: 6.00 ms" in compile_text(record(31.0, 25.0))
    assert "after about 40,000 decode steps" in compile_text(record(31.0, 25.0))  # 240 s / 6 ms
    both = compile_text({"runs": [record(31.0, 25.0), record(31.0, 32.0)]})
    assert both.count("`generate(..., compile=True)`") == 2 and "\n\n" in both
    assert "AotDecoder" not in compile_text(record(31.0, 25.0))  # not run: not said
    aot = {**record(31.0, 25.0), "aot_s": 20.0, "aot_step_ms": {"median": 21.0, "q1": 20.5,
                                                                "q3": 21.5},
           "aot_same_tokens": True}
    assert "took 20 s to make; its step takes 21.00 ms" in compile_text(aot)
    assert "repays its making after about 2,000 decode steps" in compile_text(aot)  # 20 s / 10 ms
    assert "it does not pay" in compile_text({**aot, "aot_step_ms": {"median": 32.0, "q1": 32.0,
                                                                     "q3": 32.0}})


def test_aot_check_times_the_ahead_of_time_step():
    import torch

    import kvlib
    from kvlib.bench.overhead import aot_check
    from kvlib.bench.plan import PROMPT

    model = kvlib.load_model("tiny-llama")
    idx = torch.tensor([PROMPT])
    ref = kvlib.generate(model, idx, 12, cache="prealloc").tokens[0, idx.shape[1] + 1:].tolist()
    out = aot_check(model, idx, 12, ref)
    assert out["aot_same_tokens"] is True and out["aot_s"] > 0
    assert out["aot_step_ms"]["median"] > 0
    assert aot_check(kvlib.load_model("tiny-gpt-oss"), idx, 12, ref) == {}  # not compiled


def test_payback_steps_is_compile_time_over_the_saving():
    from kvlib.compiling import payback_steps

    assert payback_steps(24.0, 2.0, 1.2) == pytest.approx(30_000)  # 24 s / 0.8 ms
    assert payback_steps(1.0, 5.0, 4.0) == pytest.approx(1_000)
    assert payback_steps(24.0, 2.0, 2.0) == float("inf")  # nothing saved: it never pays
    assert payback_steps(24.0, 2.0, 2.5) == float("inf")  # slower compiled


REPORT_ARGS = ["report", "benchmarks/results.json", "--plots-dir", "benchmarks", "--compile",
               "benchmarks/compile.json", "--lockstep", "benchmarks/lockstep.json",
               "--lockstep", "benchmarks/lockstep-gpt2-intel.json",
               "--lockstep", "benchmarks/lockstep-mini-llama-1.json",
               "--lockstep", "benchmarks/lockstep-mini-llama-2.json",
               "--lockstep", "benchmarks/lockstep-mini-llama-1-amd.json",
               "--lockstep", "benchmarks/lockstep-mini-llama-2-amd.json",
               "--gap", "benchmarks/gap-mini-llama-1.json",
               "--gap", "benchmarks/gap-mini-llama-2.json",
               "--gap", "benchmarks/gap-gpt2-intel.json",
               "--gap", "benchmarks/gap-mini-llama-1-amd.json",
               "--gap", "benchmarks/gap-mini-llama-2-amd.json",
               "--also", "benchmarks/modern.json", "--streaming", "benchmarks/streaming.json",
               "--streaming", "benchmarks/streaming-compiled.json",
               "--streaming", "benchmarks/streaming-amd.json",
               "--streaming", "benchmarks/streaming-compiled-amd.json",
               "--serving", "benchmarks/serving.json", "--serving", "benchmarks/serving-amd.json",
               "--compress", "benchmarks/compress.json",
               "--speculative", "benchmarks/speculative.json", "--surgery",
               "benchmarks/surgery.json", "--latent", "benchmarks/latent.json",
               "--flexpaged", "benchmarks/flexpaged.json",
               "--flexpaged", "benchmarks/flexpaged-amd.json"]


def test_the_stored_results_render_to_the_stored_report(capsys, monkeypatch):
    """benchmarks/RESULTS.md is exactly what the report command (the one RESULTS.md names)
    makes of the stored JSON files."""
    from kvlib.bench import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    main(REPORT_ARGS)
    stored = (root / "benchmarks" / "RESULTS.md").read_text()
    assert capsys.readouterr().out == stored
    assert "python -m kvlib.bench " + " ".join(REPORT_ARGS) in stored


def _floor(dtype: str, nbytes: int, ms: float) -> dict:
    return {"model": "gpt2", "dtype": dtype, "device": "cpu", "batch": 1, "new_tokens": 50,
            "kv_len": 0, "weight_nbytes": nbytes, "kv_nbytes": 0, "ms": {"median": ms}}


def test_a_slow_half_precision_floor_is_flagged():
    from kvlib.bench.report import floor_check_lines, floor_gbps

    f32 = _floor("float32", 500_000_000, 25.0)  # 20 GB/s
    healthy = _floor("bfloat16", 250_000_000, 14.0)  # 17.9 GB/s
    slow = _floor("bfloat16", 250_000_000, 300.0)  # 0.8 GB/s: the old AMD run's symptom
    assert floor_gbps(f32) == 20.0
    assert floor_check_lines([f32, healthy], {"cpu_fast_bf16": True}) == []
    (line,) = floor_check_lines([f32, slow], {"cpu_fast_bf16": False})
    assert "gpt2 bfloat16 floor streams 0.8 GB/s, 0.04x the float32 floor's 20.0 GB/s" in line
    assert "no bfloat16 matrix instructions" in line
    assert floor_check_lines([slow], {}) == []  # nothing to compare with


def test_report_appends_other_runs(tmp_path, capsys, run_like_data):

    from kvlib.bench import main

    first, second = run_like_data(), {**run_like_data(), "title": "Modern models"}
    for name, d in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps(d))
    main(["report", str(tmp_path / "a.json"), "--also", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert out.startswith("# Benchmark results\n") and "\n---\n" in out
    assert out.index("# Modern models") > out.index("\n---\n")


def test_check_payback_grades_a_readers_payback_with_a_hint():
    import math

    from kvlib import CacheCheckError
    from kvlib.check_measure import check_payback

    assert "5 cases" in check_payback(lambda s, e, c: 1e3 * s / (e - c) if e > c else math.inf,
                                      verbose=False)
    wrong = {"times 1000": lambda s, e, c: s / (e - c) if e > c else math.inf,
             "return math.inf": lambda s, e, c: 1e3 * s / (e - c),  # divides by zero
             "first_run_s / (eager - compiled)": lambda s, e, c: 1e3 * s / e}
    for hint, fn in wrong.items():
        with pytest.raises(CacheCheckError, match=re.escape(hint)):
            check_payback(fn, verbose=False)
    with pytest.raises(CacheCheckError, match="never pays back"):  # negative for a slower step
        check_payback(lambda s, e, c: 1e3 * s / (e - c) if e != c else math.inf, verbose=False)


def test_target_line_shows_a_third_decimal_only_where_rounding_hides_the_verdict():
    from kvlib.bench.report import target_line

    row = {"target": "step / floor", "op": "<=", "limit": 1.15, "detail": "", "met": False}
    assert "| 1.151x | <= 1.15 | **no** |" in target_line({**row, "value": 1.1512})
    assert "| 1.16x |" in target_line({**row, "value": 1.1612})
    assert "| 1.149x | <= 1.15 | yes |" in target_line({**row, "value": 1.1494, "met": True})
