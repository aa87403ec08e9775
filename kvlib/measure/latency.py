"""Time every generation step with several strategies: what ``kvlib.plots.plot_latency`` draws.

The step times are ``generate_stream``'s (a ``kvlib.timing.Stopwatch`` around each step, synced
with the device); ``measure_latency`` borrows the reader's model and hands it back as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..generate import Step, generate_stream
from ..models import CausalLM
from ..state import model_device, preserved_state
from ..style import strategy_label
from ..timing import tokens_per_s
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
