"""KV-cache strategies behind one small interface.

Every cache lives inside one attention layer and stores that layer's keys and values laid out
``[batch, heads, tokens, head_dim]``, where heads are the key/value heads (fewer than the query
heads under grouped-query attention, which is the point: the cache shrinks by the same factor).
The attention layer calls ``update(keys, values)`` with the new tokens' keys and values and
attends over what it returns. The tensors are buffers registered with ``persistent=False``: they
move with ``model.to(...)`` but never enter ``state_dict()``.

| strategy   | class                | memory held                  | what attention sees     |
|------------|----------------------|------------------------------|-------------------------|
| "none"     | ``NoCache``          | nothing                      | the tokens passed in    |
| "concat"   | ``ConcatCache``      | grows by one token per step  | every earlier token     |
| "prealloc" | ``PreallocCache``    | ``max_len`` tokens, up front | every earlier token     |
| "sliding"  | ``SlidingWindowCache`` | ``window`` tokens, up front | the last ``window``     |

``kvlib.streaming`` adds "sinks" (attention sinks + a window, StreamingLLM) and "recompute"
(the window recomputed at every step, the baseline sinks are measured against); ``kvlib.compress``
adds "bf16", "quantized" (int8/int4 keys and values) and "evict" (H2O's heavy hitters).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """The interface (Hugging Face vocabulary) and the checks every strategy shares."""

    name: str = "base"
    window: int | None = None  # attention span in tokens; None = everything before
    is_sliding: bool = False  # slots are reused: a slot's position is not its index
    prefill_limit: int | None = None  # most tokens one call may bring (None: any number)
    recompute_span: int | None = None  # "recompute": the last tokens a step recomputes
    pad: Tensor | None = None  # (B,) left padding of each row of a batch; see set_padding
    wants_scores: bool = False  # attend() hands it the attention weights (eviction, H2O)

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0  # tokens written so far (the next token's position in this cache)

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store new ``(B, H, T, D)`` keys/values; return the keys/values attention must see."""
        raise NotImplementedError

    def get_seq_length(self) -> int:
        """Tokens this cache has been given since the last reset."""
        return self.seen

    def reset(self) -> None:
        """Forget every token (buffers may be kept for reuse)."""
        self.seen = 0

    @property
    def capacity(self) -> int | None:
        """Most tokens the cache can hold at once; None when it grows without bound."""
        return None

    @property
    def tokens_held(self) -> int:
        """Tokens whose keys and values are in the cache now."""
        cap = self.capacity
        return self.seen if cap is None else min(self.seen, cap)

    def slot_positions(self) -> list[int]:
        """The position of the token each slot of the key buffer holds, in slot order, -1 for a
        slot not written yet (pictures and tests). Caches that append keep position p in slot p."""
        keys = getattr(self, "keys", None)
        slots = 0 if keys is None else keys.shape[2]
        return [s if s < self.tokens_held else -1 for s in range(slots)]

    @property
    def nbytes(self) -> int:
        """Bytes of key/value storage this cache holds right now."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def next_positions(self, T: int) -> Tensor | None:
        """Positions ``(B, T)`` of the next ``T`` tokens of each row when the rows of a batch
        differ (left padding: a row's first real token is at position 0); None when every row
        continues at ``seen``, the model's own counter."""
        if self.pad is None:
            return None
        pos = torch.arange(self.seen, self.seen + T, device=self.pad.device)
        return (pos[None, :] - self.pad[:, None]).clamp_min(0)  # (B, T); padding sits at 0

    def batch_mask(self, q_len: int, kv_len: int) -> Tensor | None:
        """Boolean ``(B, 1, q_len, kv_len)`` mask when rows differ (None: they do not): a query
        sees the keys up to its own slot, never a row's padding. A padding query sees itself
        only, so that its (unused) output stays finite: a row with nothing to attend to would
        give NaN, and NaN times a zero weight is still NaN in the next layer."""
        if self.pad is None:
            return None
        q_slot = torch.arange(kv_len - q_len, kv_len, device=self.pad.device)[:, None]  # (T, 1)
        k_slot = torch.arange(kv_len, device=self.pad.device)[None, :]  # (1, S)
        real = k_slot[None] >= self.pad[:, None, None]  # (B, 1, S): not padding
        mask = (k_slot <= q_slot)[None] & real | (k_slot == q_slot)[None]  # (B, T, S)
        return mask[:, None]  # (B, 1, T, S): the same for every head

    def _allocate(self, like: Tensor, slots: int) -> None:
        """Fixed buffers of ``slots`` tokens, made on the first write after a reset and kept for
        the next text unless its batch size, dtype or device differ (or buffers made under
        ``torch.inference_mode``, as ``generate`` runs, would be written outside it)."""
        B, H, _, D = like.shape
        held = self.keys
        if held is None or held.shape != (B, H, slots, D) or held.dtype != like.dtype \
                or held.device != like.device or held.is_inference() != like.is_inference():
            self.keys = like.new_empty(B, H, slots, D)  # (B, H, slots, D)
            self.values = like.new_empty(B, H, slots, D)

    def _check(self, keys: Tensor, values: Tensor, held: Tensor | None) -> None:
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(
                "keys and values must have the same shape [batch, heads, tokens, head_dim], "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if held is None or self.seen == 0:
            return
        if keys.dtype != held.dtype or keys.device != held.device:
            raise TypeError(
                f"new keys are {keys.dtype} on {keys.device} but the cache holds {held.dtype} "
                f"on {held.device}; call model.reset_kv_cache() after moving or casting the model"
            )
        if keys.shape[0] != held.shape[0] or keys.shape[1::2] != held.shape[1::2]:
            raise ValueError(
                f"the cache holds batch size {held.shape[0]} (shape {tuple(held.shape)}) but got "
                f"keys of shape {tuple(keys.shape)}; call model.reset_kv_cache() before a new batch"
            )


class NoCache(KVCache):
    """Keeps nothing: every step must feed the whole sequence again (recomputation)."""

    name = "none"

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        self.window = window  # lets the no-cache model attend over a window, as a reference

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self._check(keys, values, None)
        self.seen += keys.shape[2]
        return keys, values

    @property
    def capacity(self) -> int | None:
        return 0


class ConcatCache(KVCache):
    """The simple cache: append with ``torch.cat`` (a new tensor and a full copy every step)."""

    name = "concat"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("keys", None, persistent=False)  # (B, H, T, D)
        self.register_buffer("values", None, persistent=False)

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self._check(keys, values, self.keys)
        if self.seen == 0:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        self.seen += keys.shape[2]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.keys, self.values = None, None


class PreallocCache(KVCache):
    """Buffers for ``max_len`` tokens allocated once; each step writes into the next slice."""

    name = "prealloc"

    def __init__(self, max_len: int) -> None:
        super().__init__()
        if max_len <= 0:
            raise ValueError(f"max_len must be a positive number of tokens, got {max_len}")
        self.max_len = max_len
        self.register_buffer("keys", None, persistent=False)  # (B, H, max_len, D)
        self.register_buffer("values", None, persistent=False)

    @property
    def capacity(self) -> int | None:
        return self.max_len

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self._check(keys, values, self.keys)
        start, end = self.seen, self.seen + keys.shape[2]
        if end > self.max_len:
            raise RuntimeError(
                f"PreallocCache is full: it holds {start} of {self.max_len} tokens and cannot take "
                f"{keys.shape[2]} more; set it up with a larger max_len "
                "(model.set_kv_cache('prealloc', max_len=...)) or call model.reset_kv_cache()"
            )
        if start == 0:
            self._allocate(keys, self.max_len)
        K, V = self.keys, self.values  # (B, H, max_len, D)
        K[:, :, start:end] = keys  # write the new tokens into their slots
        V[:, :, start:end] = values
        self.seen = end
        return K[:, :, :end], V[:, :, :end]  # a view of the filled part: no copy


class SlidingWindowCache(KVCache):
    """A ring of ``window`` slots: token at position p lives in slot ``p % window``.

    Decoding writes the newest token over the oldest and attends over all filled slots (their order
    does not matter: every key carries its own position, added to GPT-2's embeddings or rotated
    into a RoPE key before it is stored, so keys need no slot order). A
    multi-token update attends over the window that precedes it plus every new token, and the
    attention mask limits each query to its own last ``window`` keys, then keeps only the last
    ``window`` tokens.
    """

    name = "sliding"
    is_sliding = True

    def __init__(self, window: int) -> None:
        super().__init__()
        if window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {window}")
        self.window = window
        self.register_buffer("keys", None, persistent=False)  # (B, H, window, D)
        self.register_buffer("values", None, persistent=False)

    @property
    def capacity(self) -> int | None:
        return self.window

    def slot_positions(self) -> list[int]:
        """The position each slot holds (-1 for an empty slot): slot ``p % window`` holds ``p``."""
        W, n = self.window, self.seen
        return [n - 1 - (n - 1 - s) % W if s < n else -1 for s in range(W)]

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self._check(keys, values, self.keys)
        W, start, T = self.window, self.seen, keys.shape[2]
        if start == 0:
            self._allocate(keys, W)
        if T == 1:  # the decode step: overwrite the oldest slot, attend over the filled ones
            slot = start % W
            self.keys[:, :, slot : slot + 1] = keys
            self.values[:, :, slot : slot + 1] = values
            self.seen = start + 1
            filled = min(self.seen, W)
            return self.keys[:, :, :filled], self.values[:, :, :filled]
        # Several tokens: the previous window in position order, then the new tokens.
        past = torch.arange(max(0, start - W), start, device=keys.device) % W
        all_k = torch.cat([self.keys[:, :, past], keys], dim=2)
        all_v = torch.cat([self.values[:, :, past], values], dim=2)
        keep = torch.arange(max(start, start + T - W), start + T, device=keys.device)
        self.keys[:, :, keep % W] = keys[:, :, keep - start]
        self.values[:, :, keep % W] = values[:, :, keep - start]
        self.seen = start + T
        return all_k, all_v


def attention_mask(q_len: int, kv_len: int, window: int | None, device) -> Tensor | None:
    """Boolean ``(q_len, kv_len)`` mask (True = may attend) for queries that are the last ``q_len``
    of ``kv_len`` consecutive positions; None when every key is visible (a decode step)."""
    if q_len == 1 and (window is None or kv_len <= window):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


STRATEGIES: dict[str, type[KVCache]] = {
    "none": NoCache,
    "concat": ConcatCache,
    "prealloc": PreallocCache,
    "sliding": SlidingWindowCache,
}
