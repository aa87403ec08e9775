"""Streaming past the context: the loss along a long text per strategy (StreamingLLM's figure 3),
which tokens an attention-sink cache holds at a step, and the attention mass on the first tokens.

    nll = {"sinks (4 + window 252)": kvlib.perplexity(model, ids, "sinks", 252, n_sink=4).nll, ...}
    plot_stream_loss(nll, context=256)
    plot_stream_state(nll, n_sink=4, window=252, step=1000)    # one frame of the scrubber
    plot_first_token_attention(kvlib.attention_to_first(model, ids[:, :256]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

from ..style import COLORS
from .figure import PlotFigure, figure_png
from .training import smooth

_STYLE = {"no cache": ("none", "-"), "sliding": ("sliding", "-"), "recompute": ("recompute", "--"),
          "sinks": ("sinks", "-")}


def _color(label: str, i: int) -> tuple[str, str]:
    """A colour and line style from the strategy a label starts with; sink curves other than
    the first get matplotlib's next colours."""
    for start, (key, ls) in _STYLE.items():
        if label.startswith(start):
            return COLORS[key] if i == 0 or key != "sinks" else f"C{i + 3}", ls
    return f"C{i}", "-"


def _loss_axes(ax, nll: Mapping[str, Tensor | Sequence[float]], width: int, upto: int | None,
               context: int | None) -> None:
    sinks_seen = 0
    for label, values in nll.items():
        v = np.asarray(values, dtype=np.float64)
        x = np.arange(1, len(v) + 1)  # the loss of token t is the prediction from t tokens
        color, ls = _color(label, sinks_seen)
        sinks_seen += label.startswith("sinks")
        shown = slice(None, upto)
        ax.plot(x[shown], smooth(v, width)[shown], color=color, ls=ls, lw=1.3, label=label)
    n = max(len(v) for v in nll.values())
    if context is not None:
        ax.axvline(context, color=COLORS["context-limit"], lw=1, ls=":")
        ax.annotate("trained context", (context, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, color="#777777")
    ax.set_xlim(0, n + 1)
    ax.set_xlabel("position in the text (tokens)")
    ax.set_ylabel(f"loss, mean of {width} tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def plot_stream_loss(nll: Mapping[str, Tensor | Sequence[float]], context: int | None = None,
                     width: int = 64, ylim: tuple[float, float] | None = None) -> PlotFigure:
    """Per-token loss along one long text, a running mean over ``width`` tokens, one line per
    strategy (``nll``: label -> the ``Perplexity.nll`` of that strategy)."""
    fig = PlotFigure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    _loss_axes(ax, nll, width, None, context)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return fig


def _held(n: int, n_sink: int, window: int, total: int) -> np.ndarray:
    """Per position of the text after ``n`` tokens: 0 not seen yet, 1 evicted, 2 in the window,
    3 a sink."""
    state = np.zeros(total, dtype=np.int64)
    state[:n] = 1
    state[max(n - window, 0) : n] = 2
    state[: min(n_sink, n)] = 3
    return state


def plot_stream_state(nll: Mapping[str, Tensor | Sequence[float]], n_sink: int, window: int,
                      step: int, context: int | None = None, width: int = 64,
                      ylim: tuple[float, float] | None = None) -> PlotFigure:
    """After ``step`` tokens: a strip of every position of the text, coloured by what a cache of
    ``n_sink`` sinks and a ``window`` holds (sinks, window, evicted, not yet read), above the loss
    curves up to that token."""
    total = max(len(v) for v in nll.values()) + 1
    fig = PlotFigure(figsize=(7.5, 4.4), layout="constrained")
    strip, ax = fig.subplots(2, 1, height_ratios=(1, 5), sharex=True)
    colors = [COLORS["empty"], COLORS["evicted"], COLORS["filled"], COLORS["sink"]]
    state = _held(step, n_sink, window, total)
    from matplotlib.colors import ListedColormap

    strip.imshow(state[None], aspect="auto", cmap=ListedColormap(colors), vmin=0, vmax=3,
                 extent=(0, total, 0, 1), interpolation="nearest")
    strip.set_yticks([])
    held = min(step, n_sink) + min(max(step - n_sink, 0), window)
    strip.set_title(f"after {step:,} tokens the cache holds {held}: {min(step, n_sink)} sinks "
                    f"(pink) + the last {held - min(step, n_sink)} (blue); grey: evicted",
                    fontsize=9)
    _loss_axes(ax, nll, width, step, context)
    ax.axvline(step, color=COLORS["step-marker"], lw=1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return fig


def stream_state_pngs(nll: Mapping[str, Tensor | Sequence[float]], n_sink: int, window: int,
                      steps: Sequence[int], context: int | None = None,
                      ylim: tuple[float, float] | None = None, dpi: int = 70) -> list[bytes]:
    """``plot_stream_state`` at each of ``steps``, as PNG bytes (the scrubber's frames)."""
    return [figure_png(plot_stream_state(nll, n_sink, window, s, context, ylim=ylim), dpi=dpi)
            for s in steps]


def plot_first_token_attention(mass: Tensor, n_first: int = 4, keys: int | None = None
                               ) -> PlotFigure:
    """The attention mass ``(layers, heads)`` on the first ``n_first`` tokens
    (``kvlib.attention_to_first``): one dot per head, the mean per layer, and, if ``keys`` is
    given, the share those tokens would get if attention were spread evenly over ``keys`` keys."""
    m = mass.numpy()
    fig = PlotFigure(figsize=(6.5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    layers = np.arange(m.shape[0])
    for h in range(m.shape[1]):
        ax.scatter(layers, m[:, h], s=14, color=COLORS["sinks"], alpha=0.45,
                   label="one head" if h == 0 else None)
    ax.plot(layers, m.mean(axis=1), color="black", marker="o", lw=1.2, label="mean of the heads")
    if keys is not None:
        ax.axhline(n_first / keys, color=COLORS["context-limit"], ls="--", lw=1,
                   label=f"spread evenly over {keys} keys")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"attention on the first {n_first} tokens")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig
