"""Generating past the context: attention sinks, and the recomputed window they are measured
against.

A sliding window (``SlidingWindowCache``) keeps memory flat, but once it drops a text's first
tokens a model trained with full attention falls apart: it had learned to park attention it does
not need on those first tokens (the "attention sinks" of StreamingLLM, Xiao et al. 2023). Keeping
a few of them fixes it:

| strategy    | class              | memory held       | what attention sees                    |
|-------------|--------------------|-------------------|----------------------------------------|
| "sinks"     | ``SinkCache``      | n_sink + window   | the first n_sink and the last window   |
| "recompute" | ``RecomputeCache`` | nothing           | the last window, recomputed every step |

Positions. StreamingLLM gives every cached token its place *in the cache*: the sinks are 0 ..
n_sink-1 and the window follows them, so the positions never pass ``n_sink + window``. With RoPE
only the distance between a query and a key counts, and the window's tokens already sit at the
right distances from each other and from the newest query (they are consecutive). Only the sinks
are too far away: their keys were rotated at positions 0 .. n_sink-1. So ``SinkCache`` keeps the
window's keys as they were rotated when they were computed and, at each step, rotates a copy of
the sink keys forward by ``delta``, to sit right before the window's oldest token: exactly
StreamingLLM's positions, at the cost of rotating ``n_sink`` keys per layer per step (not the whole
cache, as re-rotating every key would).

Sinks need RoPE. GPT-2 adds its learned positions to the token embeddings, so every key carries
its absolute position for good and cannot be moved: ``set_kv_cache("sinks")`` refuses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rotary import apply_rope
from .base import KVCache, LayerSpec, Traits
from .plain import NoCache

N_SINK = 4  # StreamingLLM's default: four initial tokens are enough for its models


def rotate(x: Tensor, inv_freq: Tensor, delta: int) -> Tensor:
    """RoPE keys ``(B, H, T, D)`` moved ``delta`` positions on: rotations add up, so a key rotated
    at ``p`` and then by ``delta`` equals the key rotated at ``p + delta``. The angles are
    computed in float64, since ``delta`` grows without bound."""
    angles = delta * inv_freq.to(x.device, torch.float64)  # (D/2,) no copy if float64 there
    angles = torch.cat([angles, angles])  # (D,): rotate_half's layout
    return apply_rope(x, angles.cos().to(x.dtype), angles.sin().to(x.dtype))


class SinkCache(KVCache):
    """The first ``n_sink`` tokens for good, the last ``window`` in a ring (StreamingLLM).

    Slots ``0 .. n_sink-1`` hold the sinks, rotated to their place before the window; slots
    ``n_sink ..`` are the ring: the token at position ``p >= n_sink`` lives in slot
    ``n_sink + (p - n_sink) % window``. Until the cache is full it fills like ``PreallocCache``
    (every token sees every earlier one, as recomputation does), and takes any number of tokens
    at once. Once full, it takes one token per call: ``kvlib.generate`` and ``kvlib.perplexity``
    feed a longer prompt in a first chunk of ``capacity`` tokens, then one at a time.
    """

    name = "sinks"
    traits = Traits(one_token_when_full=True, reuses_slots=True, compiles=True)

    def __init__(self, window: int, n_sink: int = N_SINK, inv_freq: Tensor | None = None) -> None:
        super().__init__()
        if window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {window}")
        if n_sink < 0:
            raise ValueError(f"n_sink must be 0 or more tokens, got {n_sink}")
        if inv_freq is None:
            raise ValueError("SinkCache moves the sink keys with RoPE: pass the model's "
                             "inv_freq, or let model.set_kv_cache('sinks', ...) do it")
        self.recent, self.n_sink = window, n_sink
        self.inv_freq = inv_freq.double()  # (D/2,) the model's RoPE frequencies, in float64
        self.register_buffer("keys", None, persistent=False)  # (B, H, n_sink + window, D)
        self.register_buffer("values", None, persistent=False)
        self.register_buffer("sink_keys", None, persistent=False)  # (B, H, n_sink, D) unmoved

    @classmethod
    def for_layer(cls, layer: LayerSpec, window: int, n_sink: int = N_SINK) -> SinkCache:
        """Sinks move keys with RoPE, so the layer must rotate its keys, and the sinks and the
        window must fit in the positions the model was trained on."""
        if layer.inv_freq is None:
            raise ValueError("attention sinks need rotary positions (the Llama/Qwen3 family): "
                             "GPT-2 adds learned absolute positions to its embeddings, so a "
                             "cached key cannot be moved; use cache='sliding' for GPT-2")
        ctx = layer.context_length
        if n_sink + window > ctx:
            raise ValueError(f"n_sink + window = {n_sink + window} tokens, more than the "
                             f"{ctx} positions the model was trained on: make the window at "
                             f"most {ctx - n_sink}")
        return cls(window, n_sink, layer.inv_freq)

    @property
    def capacity(self) -> int | None:
        return self.n_sink + self.recent

    @property
    def delta(self) -> int:
        """How many positions the sinks are moved on now: they sit just before the window's
        oldest token, which is at position ``seen - window`` once the cache is full."""
        return max(self.seen - self.capacity, 0)

    def slot_positions(self) -> list[int]:
        """The position of the token in each slot (-1 if empty): the sinks, then the ring."""
        n, S, W = self.seen, self.n_sink, self.recent
        sinks = [p if p < n else -1 for p in range(S)]
        ring = [n - 1 - (n - 1 - S - r) % W if S + r < n else -1 for r in range(W)]
        return sinks + ring

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self._check(keys, values, self.keys)
        start, T, S = self.seen, keys.shape[2], self.n_sink
        if start == 0:
            self._allocate(keys, self.capacity)
            self.sink_keys = keys.new_empty(*keys.shape[:2], S, keys.shape[3])
        end = start + T
        if end <= self.capacity:  # still filling: append, as PreallocCache does
            self.keys[:, :, start:end] = keys
            self.values[:, :, start:end] = values
            if start < S:
                self.sink_keys[:, :, start : min(end, S)] = keys[:, :, : S - start]
            self.seen = end
            return self.keys[:, :, :end], self.values[:, :, :end]
        if T > 1:
            raise ValueError(
                f"SinkCache holds {start} tokens and is full ({self.n_sink} sinks + window "
                f"{self.recent}): past that it takes one token per call, got {T}. Feed them one "
                "at a time (kvlib.generate and kvlib.perplexity do) or call "
                "model.reset_kv_cache()"
            )
        slot = S + (start - S) % self.recent  # overwrite the window's oldest token
        self.keys[:, :, slot : slot + 1] = keys
        self.values[:, :, slot : slot + 1] = values
        self.seen = end
        if S:
            self.keys[:, :, :S] = rotate(self.sink_keys, self.inv_freq, self.delta)
        return self.keys, self.values


    def crop(self, n: int) -> None:
        """Roll back to ``n`` tokens while the ring has not wrapped (nothing overwritten yet);
        past that the window's oldest tokens are gone, and the sinks have been moved."""
        n = self._kept(n)
        if self.seen > self.capacity and n < self.seen:
            raise ValueError(
                f"SinkCache is full ({self.n_sink} sinks + window {self.recent}) and has "
                f"overwritten the window before position {self.seen - self.recent}: it rolls "
                "back only until its window first fills; generate again from the kept text")
        self.seen = n


class RecomputeCache(NoCache):
    """StreamingLLM's "sliding window with re-computation": keep nothing, and at every step run
    the model again over the last ``window`` tokens, at positions 0 .. window-1. Its first token
    is a sink by construction, so it stays accurate; it costs a forward pass over ``window``
    tokens per new token."""

    name = "recompute"
    traits = Traits(keeps_tokens=False, recomputes_window=True, rolls_back=False, compiles=True)

    def __init__(self, window: int) -> None:
        if window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {window}")
        super().__init__(window)
