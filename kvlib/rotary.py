"""The RoPE rotation itself, below every module that rotates keys: the models rotate queries and
keys by their positions (``kvlib.models.llama``), and the sink cache moves cached keys to other
positions (``kvlib.caches.streaming``)."""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension (transformers' layout:
    dimension i is paired with i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``(B, H, T, D)`` queries or keys by their positions' angles (cos, sin ``(T, D)``,
    or ``(B, 1, T, D)`` when each row of a batch has its own positions)."""
    return x * cos + rotate_half(x) * sin
