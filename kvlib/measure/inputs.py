"""What the measuring functions take: a prompt as text, ids or a tensor, and strategies written
``"concat"``, ``None`` (no cache) or ``("sliding", window)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..caches.registry import needs
from ..style import strategy_label
from ..tokenizer import encode

StrategySpec = str | None | tuple[str, int]  # "concat", None (no cache), ("sliding", window)
Prompt = str | Sequence[int] | Tensor  # text, token ids, or a (T,) / (B, T) id tensor


def split_spec(spec: StrategySpec, window: int | None = None) -> tuple[str | None, int | None]:
    """A spec as ``(strategy, window)``; a bare name takes ``window`` if its strategy needs one
    ("sliding", "sinks", "recompute")."""
    if isinstance(spec, tuple):
        return spec[0], spec[1]
    return spec, window if spec is not None and needs(spec, "window") else None


def spec_label(spec: StrategySpec, window: int | None = None) -> str:
    """The legend and menu name of a spec: "no cache", "concat", "sliding (window 8)"."""
    return strategy_label(*split_spec(spec, window))


def prompt_ids(prompt: Prompt, device: torch.device | str = "cpu") -> Tensor:
    """The prompt as a ``(B, T)`` id tensor on ``device`` (text and id lists give ``B = 1``)."""
    if isinstance(prompt, Tensor):
        return (prompt if prompt.dim() == 2 else prompt[None]).to(device)
    ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
    return torch.tensor([ids], device=device)  # (1, T)
