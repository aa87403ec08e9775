"""Latent attention's two ways to decode, timed against each other in one run.

    t = attention_modes(model, ids, first=ids.shape[1] - 32)   # a DeepSeek-family model
    t["naive"].median_ms, t["absorb"].median_ms, t["same_tokens"]

"naive" runs every cached latent through ``kv_b_proj`` into each head's keys and values at
every step; "absorb" folds ``W_UK`` into the query and ``W_UV`` after the weighted sum, so a
step reads the latents as they are (``kvlib.models.deepseek``). Both hold the same cache.
"""

from __future__ import annotations

from ..generate import generate
from ..models import DeepseekModel
from ..state import preserved_state
from .steps import DecodeTimes, time_decode

MODES = ("naive", "absorb")


def attention_modes(model: DeepseekModel, ids, first: int, cache: str = "prealloc",
                    repeats: int = 5, warmup: int = 1, new_tokens: int = 16) -> dict:
    """Each mode's decode steps after a prefill of ``ids[:, :first]``, the modes alternating
    pass by pass (the order flipped every repeat, so drift on a shared machine hits both), and
    whether greedy decoding gives the same ``new_tokens`` tokens in both."""
    if not isinstance(model, DeepseekModel):
        raise TypeError(f"attention_modes compares latent attention's modes: give it a "
                        f"DeepseekModel, not a {type(model).__name__}")
    times = {m: DecodeTimes(first) for m in MODES}
    was = model.attn_impl
    try:
        with preserved_state(model):
            for r in range(warmup + repeats):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    model.attn_impl = mode
                    one = time_decode(model, ids, first, cache)
                    if r >= warmup:
                        times[mode].seconds += one.seconds
                        times[mode].nbytes = one.nbytes
            tokens = {}
            for mode in MODES:
                model.attn_impl = mode
                tokens[mode] = generate(model, ids[:, :first], new_tokens, cache=cache).tokens
    finally:
        model.attn_impl = was
    return {**times, "same_tokens": bool((tokens["naive"] == tokens["absorb"]).all()),
            "cache_bytes": times["naive"].nbytes[-1] if times["naive"].nbytes else 0}
