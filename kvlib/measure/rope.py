"""RoPE, computed for a picture: one key vector rotated at positions 0, 1, 2, ... by a model's RoPE.

RoPE splits a head's ``head_dim`` numbers into ``head_dim / 2`` pairs (transformers' layout:
dimension ``i`` with ``i + head_dim / 2``) and turns pair ``i`` by ``position x frequency_i``
radians. The frequencies (``kvlib.models.llama.rope_frequencies``) fall geometrically from one
radian per position for pair 0 to about ``1 / rope_theta`` for the last pair: the fast pairs spin,
the slow ones barely move. ``rope_rotation`` rotates a key with kvlib's own ``apply_rope`` (the
function every attention layer calls) and returns plain data; ``kvlib.plots.plot_rope_rotation``
draws it.

    plot_rope_rotation(rope_rotation(positions=range(8), model="llama-3-8b"), pairs=(0, 8, 63))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models import PRESETS, LlamaConfig
from ..models.llama import rope_frequencies
from ..rotary import apply_rope


@dataclass
class RopeRotation:
    """One key rotated at several positions (what ``rope_rotation`` returns)."""

    positions: list[int]
    frequencies: Tensor  # (D/2,) radians per position of each pair
    rotated: Tensor  # (T, D): the key as it is cached at each position
    rope_theta: float  # the model's RoPE base

    @property
    def head_dim(self) -> int:
        return self.rotated.shape[-1]

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


def rope_rotation(key: Tensor | None = None, positions: Sequence[int] = range(8),
                  model: str | LlamaConfig = "llama-3-8b", seed: int = 0) -> RopeRotation:
    """The key ``(head_dim,)`` (random, seeded by ``seed``, when None) rotated at each of
    ``positions`` with ``model``'s RoPE (its ``rope_theta`` and scaling), as ``apply_rope``
    rotates a key before it enters the cache."""
    cfg = rope_config(model)
    if key is None:
        key = torch.randn(cfg.head_dim, generator=torch.Generator().manual_seed(seed))
    if key.shape != (cfg.head_dim,):
        raise ValueError(f"key must have shape ({cfg.head_dim},) (the head_dim of the model), "
                         f"got {tuple(key.shape)}")
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # (D/2,)
    pos = torch.tensor(list(positions), dtype=torch.float64)
    angles = pos[:, None] * inv_freq.double()[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D): rotate_half's layout
    rotated = apply_rope(key.double().expand(len(pos), -1), angles.cos(), angles.sin())
    return RopeRotation([int(p) for p in pos], inv_freq, rotated, cfg.rope_theta)
