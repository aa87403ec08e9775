"""kvlib.measure.latency: every step is timed, and the model comes back as it was."""

import pytest

import kvlib
from kvlib.measure import measure_latency


def test_latency_measures_every_step(tiny, prompt):
    seen = []
    runs = measure_latency(tiny, prompt, 6, [None, "concat", ("sliding", 4)],
                           on_step=lambda run, i: seen.append((run.label, i)))
    assert list(runs) == ["no cache", "concat", "sliding (window 4)"]
    T = len(kvlib.encode(prompt))
    for run in runs.values():
        assert run.seq_lens == [T + 1 + i for i in range(6)]
        assert len(run.seconds) == 6 and all(s > 0 for s in run.seconds)
        assert run.decode_tokens_per_s == pytest.approx(5 / sum(run.seconds[1:]))
    assert len(seen) == 18
    assert runs["no cache"].cache_nbytes == [0] * 6


def test_latency_stops_when_asked(tiny, prompt):
    calls = []
    runs = measure_latency(tiny, prompt, 20, [None, "concat"],
                           on_step=lambda run, i: calls.append(i),
                           should_stop=lambda: len(calls) >= 3)
    assert list(runs) == ["no cache"] and len(runs["no cache"].seconds) == 3


def test_latency_hands_the_model_back(reader_model, left_as_found, prompt):
    check = left_as_found(reader_model)
    measure_latency(reader_model, prompt, 4, [None, "prealloc", ("sliding", 2)])
    check()
    measure_latency(reader_model, prompt, 10, ["concat"], should_stop=lambda: True)
    check()

    def fail(run, i):
        raise KeyboardInterrupt  # a reader interrupting the cell mid-run

    with pytest.raises(KeyboardInterrupt):
        measure_latency(reader_model, prompt, 4, ["concat"], on_step=fail)
    check()
