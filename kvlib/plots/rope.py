"""RoPE as a picture: one key vector rotated at positions 0, 1, 2, ..., drawn pair by pair.

RoPE splits a head's ``head_dim`` numbers into ``head_dim / 2`` pairs (transformers' layout:
dimension ``i`` with ``i + head_dim / 2``) and turns pair ``i`` by ``position x frequency_i``
radians. The frequencies (``kvlib.models.llama.rope_frequencies``) fall geometrically from one
radian per position for pair 0 to about ``1 / rope_theta`` for the last pair: the fast pairs spin,
the slow ones barely move. ``rope_rotation`` rotates a key with kvlib's own ``apply_rope`` (the
function every attention layer calls) and returns plain data; ``plot_rope_rotation`` draws it.

    plot_rope_rotation("llama-3-8b", pairs=(0, 8, 16, 63), positions=range(8))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from torch import Tensor

from ..models import PRESETS, LlamaConfig
from ..models.llama import apply_rope, rope_frequencies
from ..style import COLORS
from .figure import PlotFigure


@dataclass
class RopeRotation:
    """One key rotated at several positions (what ``rope_rotation`` returns)."""

    positions: list[int]
    frequencies: Tensor  # (D/2,) radians per position of each pair
    rotated: Tensor  # (T, D): the key as it is cached at each position

    def pair(self, i: int) -> Tensor:
        """Pair ``i`` (dimensions ``i`` and ``i + D/2``) at every position, ``(T, 2)``."""
        half = self.rotated.shape[-1] // 2
        return torch.stack([self.rotated[:, i], self.rotated[:, i + half]], dim=-1)

    def angles(self, i: int) -> Tensor:
        """Pair ``i``'s angle at every position, radians in ``(-pi, pi]``, ``(T,)``."""
        xy = self.pair(i)
        return torch.atan2(xy[:, 1], xy[:, 0])


def rope_config(model: str | LlamaConfig) -> LlamaConfig:
    """The config of a RoPE model: a ``LlamaConfig`` or the name of one of its presets."""
    cfg = PRESETS.get(model) if isinstance(model, str) else model
    if not isinstance(cfg, LlamaConfig):
        raise ValueError(f"{model!r} is not a RoPE model: pass a LlamaConfig or one of "
                         f"{sorted(n for n, c in PRESETS.items() if isinstance(c, LlamaConfig))}")
    return cfg


def rope_rotation(key: Tensor, positions: Sequence[int], model: str | LlamaConfig = "llama-3-8b"
                  ) -> RopeRotation:
    """The key ``(head_dim,)`` rotated at each of ``positions`` with ``model``'s RoPE (its
    ``rope_theta`` and scaling), as ``apply_rope`` rotates a key before it enters the cache."""
    cfg = rope_config(model)
    if key.shape != (cfg.head_dim,):
        raise ValueError(f"key must have shape ({cfg.head_dim},) (the head_dim of the model), "
                         f"got {tuple(key.shape)}")
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # (D/2,)
    pos = torch.tensor(list(positions), dtype=torch.float64)
    angles = pos[:, None] * inv_freq.double()[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D): rotate_half's layout
    rotated = apply_rope(key.double().expand(len(pos), -1), angles.cos(), angles.sin())
    return RopeRotation([int(p) for p in pos], inv_freq, rotated)


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


def plot_rope_rotation(model: str | LlamaConfig = "llama-3-8b",
                       pairs: Sequence[int] = (0, 8, 16, 63),
                       positions: Sequence[int] = range(8), key: Tensor | None = None,
                       seed: int = 0, fig: Figure | None = None) -> Figure:
    """One panel per pair of ``pairs``: the same key (random, seeded, unless ``key`` is given)
    rotated at every position of ``positions``, one arrow per position (numbered at its tip)."""
    cfg = rope_config(model)
    half = cfg.head_dim // 2
    if not pairs or any(not 0 <= i < half for i in pairs):
        raise ValueError(f"pairs must be between 0 and {half - 1} (head_dim {cfg.head_dim} has "
                         f"{half} pairs), got {list(pairs)}")
    if key is None:
        key = torch.randn(cfg.head_dim, generator=torch.Generator().manual_seed(seed))
    rot = rope_rotation(key, positions, cfg)
    fig = fig or PlotFigure(figsize=(2.6 * len(pairs), 3.3))
    axes = fig.subplots(1, len(pairs), squeeze=False, gridspec_kw=dict(
        left=0.02, right=0.98, bottom=0.03, top=0.78, wspace=0.15))[0]
    for ax, i in zip(axes, pairs, strict=True):
        _draw_pair(ax, rot, i, cfg.head_dim)
    fig.suptitle(f"one key, rotated at positions {_positions_text(rot.positions)} "
                 f"(head_dim {cfg.head_dim}, rope_theta {cfg.rope_theta:g})", fontsize=10)
    return fig
