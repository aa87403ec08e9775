"""Turning logits into the next token: temperature, top-k, and the draw.

``warp`` gives the distribution a sampler draws from; ``sample`` draws (or takes the argmax at
temperature 0). Speculative decoding (``kvlib.speculative``) needs the distributions themselves,
so both live here, below ``generate`` and ``speculative``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def warp(logits: Tensor, temperature: float, top_k: int | None = None) -> Tensor:
    """The probabilities ``(..., vocab)`` a sampler draws from: softmax(logits / temperature),
    over the ``top_k`` largest logits only if given (float32)."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Next token ``(B, 1)`` from last-position logits ``(B, vocab)``: greedy when temperature
    is 0, else drawn from softmax(logits / temperature), optionally over the top_k logits only."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(warp(logits, temperature, top_k), num_samples=1,
                             generator=generator)
