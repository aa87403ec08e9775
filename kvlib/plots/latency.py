"""Plot milliseconds per step and decode tokens per second, from ``LatencyRun``s that
``kvlib.measure.measure_latency`` measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from ..style import strategy_color
from .figure import PlotFigure

if TYPE_CHECKING:
    from ..measure.latency import LatencyRun


def _plot_step_times(ax, runs: dict[str, LatencyRun], title: str | None) -> None:
    """Milliseconds per decode step against the sequence length, one line per run."""
    for name, run in runs.items():
        ax.plot(run.seq_lens[1:], run.ms_per_step[1:], label=name,
                color=strategy_color(run.strategy), lw=1.0)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("ms per step")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or "time per generated token", fontsize=10, loc="left")


def _plot_throughput(ax, runs: dict[str, LatencyRun]) -> None:
    """Decode tokens per second, one bar per run (0 for a run without decode steps)."""
    rates = [run.decode_tokens_per_s if len(run.seconds) > 1 else 0.0 for run in runs.values()]
    bars = ax.barh(list(runs), rates, color=[strategy_color(r.strategy) for r in runs.values()])
    for bar, rate in zip(bars, rates, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {rate:.0f}",
                va="center", fontsize=8)
    ax.set_xlabel("decode tokens / s")
    ax.invert_yaxis()
    ax.set_xlim(0, max(rates + [1.0]) * 1.3)
    ax.set_title("throughput", fontsize=10)


def plot_latency(runs: dict[str, LatencyRun], fig: Figure | None = None,
                 title: str | None = None) -> Figure:
    """Milliseconds per decode step against the sequence length (left) and decode tokens per
    second (right) for every run. The prefill (step 0) is left out of both."""
    fig = fig or PlotFigure(figsize=(10, 3.6))
    ax_steps, ax_rates = fig.subplots(1, 2, width_ratios=[2.4, 1], gridspec_kw=dict(
        left=0.07, right=0.95, bottom=0.14, top=0.9, wspace=0.5))
    _plot_step_times(ax_steps, runs, title)
    _plot_throughput(ax_rates, runs)
    return fig
