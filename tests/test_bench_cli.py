"""kvlib.bench.cli: ``python -m kvlib.bench`` talks to a person, without the profiler's noise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvlib.bench import main
from kvlib.bench.profiling import PROFILER_NOISE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_run_talks_to_a_person_without_profiler_noise(tmp_path, capfd):
    main(["run", "--models", "tiny", "--strategies", "none,prealloc,sliding", "--window", "4",
          "--new-tokens", "8", "--repeats", "1", "--no-cache-lengths", "8", "--floor-samples",
          "2", "--threads", "0", "--no-progress", "--out", str(tmp_path / "r.json")])
    out, err = capfd.readouterr()
    data = json.loads((tmp_path / "r.json").read_text())
    assert all(r["allocations"] for r in data["results"])  # the profiler did run
    for noise in PROFILER_NOISE:
        assert noise not in out + err, noise
    assert f"wrote {tmp_path / 'r.json'}" in err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    for column in ("strategy", "decode tok/s", "step / floor", "cache held"):
        assert column in header, column
    rows = [line.split() for line in lines[lines.index(header) + 2:] if line.startswith("tiny")]
    assert [row[5] for row in rows] == ["no", "prealloc", "sliding"]  # "no cache", as written
    assert "no cache" in out and "sliding (window 4)" in out and "0 B" in out
    assert f"report {tmp_path / 'r.json'}" in out


def test_python_dash_m_reports_the_stored_run():
    done = subprocess.run([sys.executable, "-m", "kvlib.bench", "report",
                           "benchmarks/results.json", "--lockstep", "benchmarks/lockstep.json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# Benchmark results") and "## Lockstep" in done.stdout


def test_streaming_bench_writes_json_and_its_report(tmp_path, capsys):
    out = tmp_path / "streaming.json"
    main(["streaming", "--model", "tiny-llama", "--length", "320", "--window", "60",
          "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out),
          "--no-progress"])
    d = json.loads(out.read_text())
    assert d["lengths"] == [40, 80, 160, 320] and d["window"] == 60
    sinks, pre = d["strategies"]["sinks"], d["strategies"]["prealloc"]
    assert len(set(sinks["bytes"])) == 1 and pre["bytes"][0] == pre["bytes"][-1]  # both fixed
    assert d["strategies"]["recompute"]["bytes"] == [0, 0, 0, 0]
    assert [t["met"] in (True, False) for t in d["targets"]] == [True, True]
    assert "sinks + window 60" in capsys.readouterr().out


def test_serving_bench_writes_json_and_its_report(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "serving.json"
    main(["serving", "--models", "tiny-llama,tiny", "--requests", "5", "--system", "12",
          "--prompt", "3,9", "--output", "3,9", "--batch", "2", "--block-size", "4",
          "--repeats", "1", "--warmup", "0", "--step-length", "24", "--threads", "1",
          "--out", str(out), "--no-progress"])
    runs = json.loads(out.read_text())["runs"]
    assert [d["model"] for d in runs] == ["tiny-llama", "tiny"]
    for d in runs:
        assert all(d["same_tokens"].values()), d["same_tokens"]  # every way: the alone tokens
        assert d["step"]["same_tokens"]
        step = d["step"]  # taken in turns: the ratio is the median of the turns'
        assert len(step["ratios"]) == step["repeats"] == 3
        assert step["ratio"] == sorted(step["ratios"])[1]
        mem = d["memory"]
        assert mem["paged (engine)"]["reserved_bytes"] <= mem["prealloc to the longest request"][
            "reserved_bytes"]
        assert d["prefix"]["hit_tokens"] > 0  # the system prompt's full blocks were shared
        assert [t["met"] in (True, False) for t in d["targets"]] == [True] * 3
    text = capsys.readouterr().out
    assert "## Serving many requests" in text and "| engine |" in text
    assert "medians of 3 turns in alternating order" in text
