"""kvlib.bench.surgery: inter-token latency from the engine's step records, and a tiny run of the
benchmark (what it returns, never how fast)."""

import json
import math

import pytest

from kvlib.bench.cli import main
from kvlib.bench.surgery import first_token_latencies, inter_token_latencies, token_steps
from kvlib.serving import StepRecord

pytestmark = pytest.mark.usefixtures("one_thread")


def _record(step, seconds, joined=(), decoded=()):
    return StepRecord(step, {}, [], list(joined), [], [], {}, {}, list(decoded), {}, seconds)


def test_latencies_add_the_steps_between_two_tokens():
    """Request 0 gets tokens in steps 0, 1, 3, 4; request 1 arrives at step 1, gets its first
    token in step 2 and the next in step 4. Steps take 1, 2, 4, 8, 16 seconds."""
    h = [_record(0, 1.0, joined=[0]), _record(1, 2.0, decoded=[0]), _record(2, 4.0, joined=[1]),
         _record(3, 8.0, decoded=[0]), _record(4, 16.0, decoded=[0, 1])]
    assert token_steps(h) == {0: [0, 1, 3, 4], 1: [2, 4]}
    assert inter_token_latencies(h) == {0: [2.0, 12.0, 16.0], 1: [24.0]}
    assert first_token_latencies(h, {0: 0, 1: 1}) == {0: 1.0, 1: 6.0}


def test_surgery_bench_writes_json_and_its_report(tmp_path, capsys):
    out = tmp_path / "surgery.json"
    main(["surgery", "--model", "tiny-llama", "--budgets", "none,8", "--decoders", "2",
          "--decode-tokens", "6", "--long-prompts", "1", "--long-len", "30", "--arrive-every",
          "2", "--block-size", "4", "--repeats", "1", "--warmup", "0", "--threads", "1",
          "--out", str(out), "--no-progress"])
    d = json.loads(out.read_text())
    c = d["chunked"]
    assert c["same_tokens"] and set(c["runs"]) == {"none", "8"}
    for r in c["runs"].values():
        assert set(r) == {"p50_itl_ms", "p99_itl_ms", "max_itl_ms", "long_ttft_ms",
                          "tokens_per_s", "wall_s", "steps", "max_step_tokens"}
        assert all(math.isfinite(v) and v > 0 for v in r.values())
        assert r["p50_itl_ms"] <= r["p99_itl_ms"] <= r["max_itl_ms"]
    assert c["runs"]["8"]["max_step_tokens"] <= 8 < c["runs"]["none"]["max_step_tokens"]
    assert c["runs"]["8"]["steps"] > c["runs"]["none"]["steps"]  # the prompt took several
    for kind in ("samples", "beams"):
        for r in d["sharing"][kind].values():
            assert 0 < r["blocks_used"] < r["blocks_unshared"] and r["saved_pct"] > 0
    text = capsys.readouterr().out
    assert "## Chunked prefill and shared blocks" in text and "| 8 |" in text
    assert "p99 / none" in text and "Target: a budget whose p99" in text


def test_chunking_pays_needs_both_the_latency_and_the_throughput():
    from kvlib.bench.surgery import chunking_pays

    def run(p99, tps):
        return {"p99_itl_ms": p99, "tokens_per_s": tps}

    c = {"runs": {"none": run(20.0, 1000.0), "128": run(12.0, 990.0), "64": run(9.0, 950.0),
                  "32": run(6.0, 850.0)}}
    assert chunking_pays(c) == ["64"]  # 128: p99 above half; 32: throughput 15% lower
    assert chunking_pays(c, throughput=0.8) == ["64", "32"]
