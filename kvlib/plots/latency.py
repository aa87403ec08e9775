"""Time every generation step with several strategies, and plot milliseconds per step.

The step times are ``generate_stream``'s (a ``kvlib.timing.Stopwatch`` around each step, synced
with the device); ``measure_latency`` borrows the reader's model and hands it back as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from matplotlib.figure import Figure

from ..generate import Step, generate_stream
from ..models import CausalLM
from ..state import model_device, preserved_state
from ..style import strategy_color, strategy_label
from ..timing import tokens_per_s
from .figure import PlotFigure
from .inputs import Prompt, StrategySpec, prompt_ids, split_spec


@dataclass
class LatencyRun:
    """Per-step wall times of one generation (index 0 is the prefill)."""

    label: str
    strategy: str | None
    window: int | None
    seconds: list[float] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)  # sequence length after each step
    cache_nbytes: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode tokens per second (the prefill excluded), as GenerationResult reports it."""
        return tokens_per_s(self.seconds[1:])

    @property
    def ms_per_step(self) -> list[float]:
        return [1000 * t for t in self.seconds]


def _record_steps(run: LatencyRun, steps: Iterable[Step],
                  on_step: Callable[[LatencyRun, int], None] | None,
                  should_stop: Callable[[], bool] | None) -> bool:
    """Add every step's time, length and cache bytes to ``run``; True if ``should_stop`` said so."""
    for step in steps:
        run.seconds.append(step.seconds)
        run.seq_lens.append(step.seq_len)
        run.cache_nbytes.append(step.cache_nbytes)
        if on_step is not None:
            on_step(run, step.index)
        if should_stop is not None and should_stop():
            return True
    return False


def measure_latency(model: CausalLM, prompt: Prompt, max_new_tokens: int,
                    strategies: Sequence[StrategySpec] = (None, "concat"),
                    window: int | None = None,
                    on_step: Callable[[LatencyRun, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> dict[str, LatencyRun]:
    """Generate ``max_new_tokens`` greedily with each strategy in turn, timing every step.

    ``on_step(run, i)`` is called after each step (for live plots); ``should_stop()`` ends the
    measurement early. Returns the runs keyed by ``strategy_label``. The model is handed back
    with its own caches, position counter, training flags, dtype and device.
    """
    ids = prompt_ids(prompt, model_device(model))
    runs: dict[str, LatencyRun] = {}
    with preserved_state(model):
        for spec in strategies:
            strategy, run_window = split_spec(spec, window)
            label = strategy_label(strategy, run_window)
            run = runs[label] = LatencyRun(label, strategy, run_window)
            steps = generate_stream(model, ids, max_new_tokens, cache=strategy, window=run_window)
            if _record_steps(run, steps, on_step, should_stop):
                break
    return runs


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
