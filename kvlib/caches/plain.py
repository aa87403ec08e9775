"""The plain strategies: nothing kept, a growing cache, a preallocated one and a sliding ring.

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
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import KVCache, Traits


class NoCache(KVCache):
    """Keeps nothing: every step must feed the whole sequence again (recomputation)."""

    name = "none"
    traits = Traits(keeps_tokens=False, takes_padding=True)

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

    def crop(self, n: int) -> None:
        self.seen = self._kept(n)  # nothing kept, nothing to cut


class ConcatCache(KVCache):
    """The simple cache: append with ``torch.cat`` (a new tensor and a full copy every step)."""

    name = "concat"
    traits = Traits(takes_padding=True)

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

    def crop(self, n: int) -> None:
        n = self._kept(n)
        if n == 0:
            return self.reset()
        self.keys, self.values = self.keys[:, :, :n], self.values[:, :, :n]  # views: no copy
        self.seen = n


class PreallocCache(KVCache):
    """Buffers for ``max_len`` tokens allocated once; each step writes into the next slice."""

    name = "prealloc"
    traits = Traits(takes_padding=True, compiles=True)

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

    def crop(self, n: int) -> None:
        self.seen = self._kept(n)  # the slots after n are written over by the next tokens


class SlidingWindowCache(KVCache):
    """A ring of ``window + lookahead`` slots: the token at position p lives in slot
    ``p % slots``; attention sees the last ``window`` tokens.

    Decoding writes the newest token over the oldest and attends over all filled slots (their order
    does not matter: every key carries its own position, added to GPT-2's embeddings or rotated
    into a RoPE key before it is stored, so keys need no slot order). A
    multi-token update attends over the window that precedes it plus every new token, and the
    attention mask limits each query to its own last ``window`` keys, then keeps only the last
    ``slots`` tokens.

    Rolling back (``crop``) needs the ``window`` tokens before the new end, and a ring overwrites
    its oldest: ``lookahead`` extra slots keep that many more, so the ring can roll back that
    many tokens (a speculative draft's), at the cost of gathering the last ``window`` slots in
    position order at each decode step.
    """

    name = "sliding"
    traits = Traits(reuses_slots=True)

    def __init__(self, window: int, lookahead: int = 0) -> None:
        super().__init__()
        if window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {window}")
        if not isinstance(lookahead, int) or lookahead < 0:
            raise ValueError(f"lookahead must be 0 or more tokens, got {lookahead!r}")
        self.window, self.lookahead = window, lookahead
        self.slots = window + lookahead
        self.register_buffer("keys", None, persistent=False)  # (B, H, slots, D)
        self.register_buffer("values", None, persistent=False)

    @property
    def capacity(self) -> int | None:
        return self.slots

    def slot_positions(self) -> list[int]:
        """The position each slot holds (-1 for an empty slot): slot ``p % slots`` holds ``p``."""
        S, n = self.slots, self.seen
        return [n - 1 - (n - 1 - s) % S if s < n else -1 for s in range(S)]

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self._check(keys, values, self.keys)
        W, S, start, T = self.window, self.slots, self.seen, keys.shape[2]
        if start == 0:
            self._allocate(keys, S)
        if T == 1:  # the decode step: overwrite the oldest slot, attend over the last window
            slot = start % S
            self.keys[:, :, slot : slot + 1] = keys
            self.values[:, :, slot : slot + 1] = values
            self.seen = start + 1
            if S == W:  # no lookahead: every filled slot is in the window
                filled = min(self.seen, W)
                return self.keys[:, :, :filled], self.values[:, :, :filled]
            window = torch.arange(max(0, self.seen - W), self.seen, device=keys.device) % S
            return self.keys[:, :, window], self.values[:, :, window]
        # Several tokens: the previous window in position order, then the new tokens.
        past = torch.arange(max(0, start - W), start, device=keys.device) % S
        all_k = torch.cat([self.keys[:, :, past], keys], dim=2)
        all_v = torch.cat([self.values[:, :, past], values], dim=2)
        keep = torch.arange(max(start, start + T - S), start + T, device=keys.device)
        self.keys[:, :, keep % S] = keys[:, :, keep - start]
        self.values[:, :, keep % S] = values[:, :, keep - start]
        self.seen = start + T
        return all_k, all_v

    def crop(self, n: int) -> None:
        """Roll back to ``n`` tokens if the ring still holds the window before position ``n``:
        always before it first wraps, and by up to ``lookahead`` tokens after."""
        n = self._kept(n)
        oldest = self.seen - self.slots  # the oldest position still in the ring
        if self.seen > self.slots and n - self.window < oldest:
            raise ValueError(
                f"the ring of {self.slots} slots holds positions {oldest}..{self.seen - 1}, and "
                f"rolling back to {n} tokens needs the window from position {n - self.window}, "
                f"which has been overwritten: a ring rolls back only as far as its lookahead "
                f"({self.lookahead}); set it up with lookahead={self.seen - n} or more "
                "(model.set_kv_cache('sliding', window=..., lookahead=...))")
        self.seen = n
