"""RoPE as a picture: one key vector rotated at positions 0, 1, 2, ..., drawn pair by pair, from the
``RopeRotation`` that ``kvlib.measure.rope_rotation`` computes (the fast pairs spin, the slow ones
barely move).

    plot_rope_rotation(rope_rotation(positions=range(8), model="llama-3-8b"), pairs=(0, 8, 16, 63))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from ..style import COLORS
from .figure import PlotFigure

if TYPE_CHECKING:
    from ..measure.rope import RopeRotation


def _draw_pair(ax, rot: RopeRotation, i: int, head_dim: int) -> None:
    """Arrows from the origin to pair ``i`` at every position, lighter for earlier positions."""
    xy = rot.pair(i)
    radius = float(xy[0].norm())
    cmap = LinearSegmentedColormap.from_list("rope", [COLORS["rope-first"], COLORS["rope-last"]])
    n = len(rot.positions)
    ax.add_patch(Circle((0, 0), radius, fill=False, ls=":", lw=0.8, color=COLORS["outline"]))
    for t, (p, (x, y)) in enumerate(zip(rot.positions, xy.tolist(), strict=True)):
        color = cmap(t / max(n - 1, 1))
        ax.annotate("", xy=(x, y), xytext=(0, 0),
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=1.4, shrinkA=0, shrinkB=0))
        ax.text(1.13 * x, 1.13 * y, str(p), ha="center", va="center", fontsize=7, color=color)
    lim = 1.3 * radius
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    freq = float(rot.frequencies[i])
    turned = math.degrees(freq * (rot.positions[-1] - rot.positions[0]))
    ax.set_title(f"pair {i} (dims {i}, {i + head_dim // 2})\n{freq:.3g} rad per position\n"
                 f"{turned:.3g}° from position {rot.positions[0]} to {rot.positions[-1]}",
                 fontsize=8)


def _positions_text(positions: list[int]) -> str:
    """"0..7" for consecutive positions, else "0, 1000, 2000"."""
    if len(positions) > 2 and positions == list(range(positions[0], positions[-1] + 1)):
        return f"{positions[0]}..{positions[-1]}"
    return ", ".join(f"{p:,}" for p in positions)


def plot_rope_rotation(rot: RopeRotation, pairs: Sequence[int] = (0, 8, 16, 63),
                       fig: Figure | None = None) -> Figure:
    """One panel per pair of ``pairs``: the key of ``rot`` (``kvlib.measure.rope_rotation``)
    rotated at every one of its positions, one arrow per position (numbered at its tip)."""
    head_dim = rot.head_dim
    half = head_dim // 2
    if not pairs or any(not 0 <= i < half for i in pairs):
        raise ValueError(f"pairs must be between 0 and {half - 1} (head_dim {head_dim} has "
                         f"{half} pairs), got {list(pairs)}")
    fig = fig or PlotFigure(figsize=(2.6 * len(pairs), 3.3))
    axes = fig.subplots(1, len(pairs), squeeze=False, gridspec_kw=dict(
        left=0.02, right=0.98, bottom=0.03, top=0.78, wspace=0.15))[0]
    for ax, i in zip(axes, pairs, strict=True):
        _draw_pair(ax, rot, i, head_dim)
    fig.suptitle(f"one key, rotated at positions {_positions_text(rot.positions)} "
                 f"(head_dim {head_dim}, rope_theta {rot.rope_theta:g})", fontsize=10)
    return fig
