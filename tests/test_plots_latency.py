"""kvlib.plots.latency: the lines and bars are the runs it is given, the prefill left out."""

import pytest

from kvlib.measure import LatencyRun
from kvlib.plots import plot_latency


def test_the_picture_draws_the_runs_it_is_given():
    runs = {"no cache": LatencyRun("no cache", None, None, [0.5, 0.01, 0.02, 0.03], [5, 6, 7, 8]),
            "concat": LatencyRun("concat", "concat", None, [0.5, 0.01, 0.01, 0.01], [5, 6, 7, 8])}
    fig = plot_latency(runs, title="made up")
    steps, rates = fig.axes[:2]
    assert len(steps.lines) == 2
    for line, run in zip(steps.lines, runs.values(), strict=True):
        assert list(line.get_xdata()) == run.seq_lens[1:]  # the prefill (step 0) is left out
        assert list(line.get_ydata()) == pytest.approx(run.ms_per_step[1:])
    assert [b.get_width() for b in rates.patches] == pytest.approx([50.0, 100.0])
    assert steps.get_title(loc="left") == "made up"


def test_a_run_without_decode_steps_gets_an_empty_bar():
    fig = plot_latency({"concat": LatencyRun("concat", "concat", None, [0.5], [5])})
    assert [b.get_width() for b in fig.axes[1].patches] == [0.0]
