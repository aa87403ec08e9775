"""kvlib.bench.profiling: allocations per decode step, counted without the profiler's noise."""

import os

import pytest

import kvlib
from kvlib.bench.profiling import alloc_steps, quiet_profiler


def test_allocations_grow_with_concat_only(bench_run):
    cfg = kvlib.GPTConfig.from_preset("tiny")
    per_token = cfg.n_layers * 2 * cfg.n_heads * cfg.head_dim * 4
    res = {r["strategy"]: r["allocations"] for r in bench_run[2]["results"]}
    (a, b) = res["concat"]
    # every step's torch.cat copies the whole cache into new tensors
    assert b["bytes"] - a["bytes"] >= (b["seq_len"] - a["seq_len"]) * per_token
    (a, b) = res["prealloc"]
    assert abs(b["bytes"] - a["bytes"]) < (b["seq_len"] - a["seq_len"]) * per_token
    assert a["count"] == b["count"]


@pytest.mark.parametrize("n, want", [(64, [29, 60]), (12, [3, 8]), (6, [1]), (4, [])])
def test_alloc_steps_are_apart_and_inside_the_run(n, want):
    assert alloc_steps(n) == want


def test_quiet_profiler_drops_only_the_profiler_chatter(capfd):
    with quiet_profiler():
        os.write(2, b"USDT:2026 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
                    b"[W] Memory block of unknown size was allocated before the profiling\n"
                    b"a real warning\n")
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert err == "a real warning\nafter\n"
