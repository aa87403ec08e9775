"""Compressing the cache, drawn: the keys' outlier channels, the accuracy-memory frontier of
quantized and evicting caches, and one choice of bits, group size and budget. The numbers come
from ``kvlib.measure.compress``; these functions only draw them.

    plot_channel_magnitudes(*cached_keys_values(model, ids, layer=2))
    plot_frontier(measure_frontier(model, rows, CONFIGS))
    plot_compression(compression_tradeoff(model, rows, bits=4, group_size=32, budget=64))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from ..style import COLORS
from .figure import PlotFigure

if TYPE_CHECKING:
    from ..measure.compress import FrontierPoint, Tradeoff

FAMILY_STYLE = {  # marker and colour per kind of cache
    "full": ("o", COLORS["concat"]), "bf16": ("D", COLORS["prealloc"]),
    "quantized": ("s", COLORS["sinks"]), "evict": ("^", COLORS["hf-dynamic"]),
}


def plot_channel_magnitudes(keys: Tensor, values: Tensor, head: int = 0) -> PlotFigure:
    """``|keys|`` and ``|values|`` of one head, token by channel: keys show a few channels large
    in every token (columns), values no such pattern."""
    fig = PlotFigure(figsize=(8.0, 3.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (name, x) in zip(axes, (("keys", keys), ("values", values)), strict=True):
        a = x[head].abs().numpy()  # (T, D)
        im = ax.imshow(a, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"|{name}|, head {head}: largest {a.max():.1f}, median {np.median(a):.2f}",
                     fontsize=9)
        ax.set_xlabel("channel")
        fig.colorbar(im, ax=ax, shrink=0.85)
    axes[0].set_ylabel("token")
    return fig


def plot_frontier(points: list[FrontierPoint], targets: Mapping[str, float] | None = None
                  ) -> PlotFigure:
    """Perplexity increase over the full-precision cache against the bytes held (a fraction of
    the full cache's), one marker per cache; ``targets``: label -> a perplexity increase to draw
    as a dotted line."""
    fig = PlotFigure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    seen = set()
    for p in points:
        marker, color = FAMILY_STYLE.get(p.family, ("o", "C0"))
        y = max(p.perplexity_increase * 100, 1e-3)  # %, on a log axis
        ax.scatter(p.bytes_ratio, y, marker=marker, color=color, s=46, zorder=3,
                   label=None if p.family in seen else p.family)
        seen.add(p.family)
        ax.annotate(p.label, (p.bytes_ratio, y), xytext=(5, 3), textcoords="offset points",
                    fontsize=7.5)
    for name, value in (targets or {}).items():
        ax.axhline(value * 100, color="#999999", lw=0.8, ls=":")
        ax.annotate(name, (1.0, value * 100), xytext=(-2, 2), textcoords="offset points",
                    ha="right", fontsize=7.5, color="#777777")
    ax.set_yscale("log")
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(f"bytes held after {points[0].tokens} tokens (fraction of the full cache)")
    ax.set_ylabel("perplexity above the full cache's (%)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("lower left is better: less memory, less damage (0.001% = no change)",
                 fontsize=9)
    return fig


def plot_compression(t: Tradeoff) -> PlotFigure:
    """Bytes held (left) and perplexity above the full cache's (right) for one ``Tradeoff``."""
    fig = PlotFigure(figsize=(8.0, 3.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    names = ["full (fp32)", f"int{t.bits}, group {t.group_size}", f"evict, budget {t.budget}"]
    colors = [FAMILY_STYLE[f][1] for f in ("full", "quantized", "evict")]
    kib = [t.full_nbytes / 1024, t.quantized_nbytes / 1024, t.evict_nbytes / 1024]
    left.barh(names, kib, color=colors)
    for i, v in enumerate(kib):
        left.annotate(f"{v:,.0f} KiB ({v / kib[0]:.2f}x)", (v, i), xytext=(3, 0),
                      textcoords="offset points", va="center", fontsize=8)
    left.set_xlim(0, kib[0] * 1.6)
    left.invert_yaxis()
    left.set_xlabel(f"cache bytes after {t.tokens} tokens (KiB, every layer)")
    up = [0.0, t.quantized_perplexity / t.full_perplexity - 1,
          t.evict_perplexity / t.full_perplexity - 1]
    right.barh(names, [100 * u for u in up], color=colors)
    for i, u in enumerate(up):
        right.annotate(f"{100 * u:+.2f}%", (max(100 * u, 0), i), xytext=(3, 0),
                       textcoords="offset points", va="center", fontsize=8)
    right.set_xlim(0, max(100 * max(up), 1.0) * 1.35)
    right.invert_yaxis()
    right.set_yticks([])
    right.set_xlabel("perplexity above the full cache's (%)")
    return fig
