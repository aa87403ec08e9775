"""kvlib.measure.steps and kvlib.measure.stats: the timed decode loop feeds the right tokens, keeps
the right steps and hands the model back; the medians are the medians. No timing is asserted: a
fake stopwatch stands in where a number must come out."""

import math

import pytest
import torch

import kvlib
from kvlib.measure import (
    DecodeTimes,
    median,
    median_ms,
    percentiles,
    step_ms,
    summary,
    time_decode,
)
from kvlib.measure import steps as steps_module


@pytest.fixture
def ids(tiny):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny.cfg.vocab_size, (1, 12), generator=g)


class FakeStopwatch:
    """A stopwatch whose n-th reading is n milliseconds (1, 2, 3, ...), synced with nothing."""

    count = 0

    def __init__(self, device="cpu") -> None:
        self.seconds = float("nan")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        FakeStopwatch.count += 1
        self.seconds = FakeStopwatch.count / 1e3


@pytest.fixture
def fake_clock(monkeypatch):
    FakeStopwatch.count = 0
    monkeypatch.setattr(steps_module, "Stopwatch", FakeStopwatch)


def test_the_loop_keeps_one_time_per_step_and_pass(tiny, ids):
    times = time_decode(tiny, ids, first=8, cache="prealloc", repeats=3, warmup=2)
    assert isinstance(times, DecodeTimes) and times.first == 8
    assert [len(one) for one in times.seconds] == [4, 4, 4]  # 12 - 8 steps, warm-ups dropped
    assert len(times.steps) == 12 and all(s > 0 for s in times.steps)
    assert math.isfinite(times.median_ms)


def test_the_loop_prefills_then_feeds_one_more_token_per_step(tiny, ids, monkeypatch):
    seen = []
    real_prefill, real_decode = steps_module.prefill, steps_module.decode_one
    monkeypatch.setattr(steps_module, "prefill",
                        lambda m, x: seen.append(("prefill", x.shape[1])) or real_prefill(m, x))
    monkeypatch.setattr(steps_module, "decode_one",
                        lambda m, x: seen.append(("decode", x.shape[1])) or real_decode(m, x))
    time_decode(tiny, ids, first=9, cache="concat", repeats=1, warmup=1)
    one_pass = [("prefill", 9), ("decode", 10), ("decode", 11), ("decode", 12)]
    assert seen == one_pass * 2  # the warm-up pass, then the kept one


def test_the_bytes_after_each_step_are_the_caches(tiny, ids):
    cfg = tiny.cfg
    per_token = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 4  # keys + values, float32
    grown = time_decode(tiny, ids, first=8, cache="concat")
    assert grown.nbytes == [per_token * n for n in (9, 10, 11, 12)]
    held = time_decode(tiny, ids, first=8, cache="prealloc", max_len=20)
    assert held.nbytes == [per_token * 20] * 4  # allocated once, for max_len tokens
    ring = time_decode(tiny, ids, first=8, cache="sliding", window=4)
    assert ring.nbytes == [per_token * 4] * 4


def test_the_loop_hands_the_model_back(reader_model, left_as_found, ids):
    check = left_as_found(reader_model)
    time_decode(reader_model, ids, first=6, cache="prealloc", repeats=2, warmup=1)
    check()
    step_ms(reader_model, ids, {"cache": "sliding", "window": 4}, steps=3, repeats=1)
    check()


def test_step_ms_is_the_median_of_the_last_steps(tiny, ids, fake_clock):
    # 2 passes of 4 steps read 1..8 ms from the fake clock: the median is 4.5 ms
    assert step_ms(tiny, ids, {"cache": "prealloc"}, steps=4, repeats=2) == pytest.approx(4.5)
    times = time_decode(tiny, ids, first=10, cache="concat", repeats=2, warmup=1)
    seconds = [[round(s * 1e3) for s in one] for one in times.seconds]
    assert seconds == [[11, 12], [13, 14]]  # the warm-up read 9 and 10
    assert times.median_ms == pytest.approx(12.5)


def test_the_loop_refuses_what_it_cannot_time(tiny, ids):
    for first in (0, 12):
        with pytest.raises(ValueError, match="first must leave"):
            time_decode(tiny, ids, first=first)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_decode(tiny, ids, first=4, repeats=0)


def test_without_a_cache_every_step_recomputes(tiny, ids):
    times = time_decode(tiny, ids, first=10, cache="none", repeats=2)
    assert [len(one) for one in times.seconds] == [2, 2] and times.nbytes == [0, 0]


def test_medians_of_known_samples():
    assert median([3, 1, 2]) == 2 and median([4, 1, 3, 2]) == 2.5
    assert median(x for x in (5.0, 7.0)) == 6.0  # any iterable
    assert math.isnan(median([])) and math.isnan(median_ms([]))
    assert median_ms([0.001, 0.004, 0.002]) == pytest.approx(2.0)


def test_summary_and_percentiles_of_known_samples():
    s = summary([1, 2, 3, 4, 5])
    assert s == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0, "n": 5}
    assert summary([])["n"] == 0 and math.isnan(summary([])["median"])
    p = percentiles(range(101))
    assert (p["p50"], p["p90"], p["p99"]) == pytest.approx((50, 90, 99))
    assert all(math.isnan(v) for v in percentiles([]).values())


def test_bench_reads_its_statistics_from_measure():
    from kvlib import bench

    assert bench.summary is kvlib.measure.summary and bench.percentiles is kvlib.measure.percentiles


def test_step_against_floor_times_both_and_hands_the_model_back(tiny):
    from kvlib.measure import step_against_floor
    from kvlib.state import preserved_state

    with preserved_state(tiny):  # the session's model as the other tests find it
        tiny.set_kv_cache("concat")  # not what step_against_floor decodes with
        before = [type(c).__name__ for c in tiny.caches], tiny.pos
        r = step_against_floor(tiny, new=3, rounds=2, prompt=5)
        assert ([type(c).__name__ for c in tiny.caches], tiny.pos) == before  # handed back
    assert set(r) == {"step_ms", "floor_ms", "beyond"}
    assert r["step_ms"] > 0 and r["floor_ms"] > 0
    assert r["beyond"] == pytest.approx(1 - r["floor_ms"] / r["step_ms"])
    for bad in ({"rounds": 1}, {"new": 0}):
        with pytest.raises(ValueError, match="round 0 warms up"):
            step_against_floor(tiny, **{"new": 3, **bad})
