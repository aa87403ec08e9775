"""The loss curves of the models trained here, drawn from their metrics files
(``kvlib/trained/<name>/metrics.json``, written by ``python -m kvlib.train``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..style import COLORS
from .figure import PlotFigure


def smooth(values: Sequence[float], width: int) -> np.ndarray:
    """The running mean over the last ``width`` values (fewer at the start)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - width, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_training(metrics: dict | Sequence[dict], smooth_steps: int = 25) -> PlotFigure:
    """Training loss (a running mean over ``smooth_steps`` steps) and validation loss against
    the step, for one model's metrics or several (one colour each)."""
    runs = [metrics] if isinstance(metrics, dict) else list(metrics)
    fig = PlotFigure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        h, name = run["history"], run["model"]
        color = COLORS.get(name, f"C{i + 2}")  # another run: matplotlib's next colours
        ax.plot(h["step"], smooth(h["loss"], smooth_steps), color=color, lw=1.2,
                label=f"{name}: training (mean of {smooth_steps} steps)")
        ax.plot(h["valid_step"], h["valid_loss"], color=color, ls="--", marker="o", ms=3,
                lw=1, label=f"{name}: validation split")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
