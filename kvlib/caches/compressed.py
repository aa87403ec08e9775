"""Compressing the cache: fewer bits per value (quantization) or fewer tokens (eviction).

| strategy    | class              | bytes per value held             | attention sees           |
|-------------|--------------------|----------------------------------|--------------------------|
| "bf16"      | ``BFloat16Cache``  | 2                                | every token              |
| "quantized" | ``QuantizedCache`` | ``bits / 8`` + scales per group  | every token              |
| "evict"     | ``EvictCache``     | the model's, ``budget`` tokens   | sinks, heavy, recent     |

The quantized cache keeps its newest ``residual`` tokens in the model's dtype.

Quantization (KIVI, Liu et al. 2024). A group of ``group_size`` numbers is stored as integers
``q`` in ``[0, 2**bits - 1]`` with one scale and one zero point (asymmetric min-max):
``x ~ q * scale + zero``, ``zero = min``, ``scale = (max - min) / (2**bits - 1)``, so every value
comes back within ``scale / 2``. Keys have a few channels much larger than the rest, the same
channels in every token, so keys are grouped *per channel* (``group_size`` tokens of one channel
share a scale): an outlier channel gets its own scale and does not blur the others. Values have no
such channels and are grouped *per token* (``group_size`` channels of one token). Keys can only be
quantized once a block of ``group_size`` tokens is there, and the newest tokens matter most, so
the last ``residual`` tokens (and the fewer than ``group_size`` before them that do not fill a
block yet) stay in full precision. Scales and zero points are stored in float16, as KIVI and
quanto do: in float32 they would cost as much as a quarter of the int8 codes at ``group_size``
32. int4 codes are packed two per byte, 2-bit codes (KIVI's setting) four.

Eviction (H2O, Zhang et al. 2023). Keep at most ``budget`` tokens: the first ``n_sink`` (attention
sinks), the last ``window``, and, between them, the "heavy hitters": the tokens that have received
the most attention so far, summed over every query that saw them. That needs the attention weights,
which a fused kernel (``F.scaled_dot_product_attention``, FlashAttention) never forms: a cache
that declares ``Traits(needs_scores=True)`` makes ``kvlib.models.base.attend`` compute the
softmax weights explicitly and hand them to ``cache.observe``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import KVCache, LayerSpec, Traits
from .plain import ConcatCache
from .streaming import N_SINK

BITS = (8, 4, 2)  # codes per byte: one (int8), two (int4), four (2-bit, KIVI's setting)
SCALE_DTYPE = torch.float16  # scales and zero points (2 bytes each)
GROUP_SIZE = 32  # KIVI's default group size (at most head_dim)


# ---- quantization: plain functions ---------------------------------------------------------------

def _rounded(x: Tensor, toward: float) -> Tensor:
    """``x`` (float32) in ``SCALE_DTYPE``, rounded toward ``toward`` (-inf or +inf) so that a lower
    bound stays a lower bound and an upper bound an upper bound."""
    y = x.to(SCALE_DTYPE)
    off = y.float() > x if toward < 0 else y.float() < x
    return torch.where(off, torch.nextafter(y, torch.full_like(y, toward)), y)


def quantize(x: Tensor, bits: int, group_size: int, dim: int = -1
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min-max quantization of ``x`` in groups of ``group_size`` consecutive numbers
    along ``dim``. Returns ``codes`` (uint8, the shape of ``x``, in ``[0, 2**bits - 1]``) and
    ``scale``, ``zero`` (``SCALE_DTYPE``, the shape of ``x`` with ``dim`` divided by
    ``group_size``); ``dequantize`` gives every number back within ``scale / 2``."""
    levels = 2**bits - 1
    x = x.float().movedim(dim, -1)  # (..., N)
    g = x.unflatten(-1, (x.shape[-1] // group_size, group_size))  # (..., N/G, G)
    lo, hi = g.amin(-1), g.amax(-1)  # (..., N/G)
    zero = _rounded(lo, float("-inf"))  # <= lo
    step = ((hi - zero.float()) / levels).clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    scale = _rounded(step, float("inf"))  # zero + levels * scale >= hi: no value is clipped
    q = ((g - zero.float()[..., None]) / scale.float()[..., None]).round().clamp(0, levels)
    codes = q.to(torch.uint8).flatten(-2).movedim(-1, dim)
    return codes, scale.movedim(-1, dim), zero.movedim(-1, dim)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int, dim: int = -1,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The numbers ``codes * scale + zero`` that ``quantize`` stood for, in ``dtype``."""
    c = codes.movedim(dim, -1)  # (..., N)
    g = c.unflatten(-1, (c.shape[-1] // group_size, group_size)).float()  # (..., N/G, G)
    s, z = scale.movedim(dim, -1).float()[..., None], zero.movedim(dim, -1).float()[..., None]
    return (g * s + z).flatten(-2).movedim(-1, dim).to(dtype)


def pack_int4(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte along the last dim: ``(..., N)`` -> ``(..., N/2)`` (N even)."""
    return pack(codes, 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of ``pack_int4``: ``(..., N/2)`` -> ``(..., N)``."""
    return unpack(packed, 4)


def pack(codes: Tensor, bits: int) -> Tensor:
    """``8 / bits`` codes of ``bits`` bits per byte along the last dim: ``(..., N)`` ->
    ``(..., N * bits / 8)``; code ``j`` of a byte sits in its bits ``j * bits ..``."""
    per = 8 // bits
    out = codes[..., 0::per].clone()
    for j in range(1, per):
        out |= codes[..., j::per] << (j * bits)
    return out


def unpack(packed: Tensor, bits: int) -> Tensor:
    """The inverse of ``pack``."""
    mask = 2**bits - 1
    return torch.stack([(packed >> (j * bits)) & mask for j in range(8 // bits)],
                       dim=-1).flatten(-2)


def quantized_nbytes(tokens: int, kv_heads: int, head_dim: int, bits: int, group_size: int,
                     residual: int = 0, dtype_bytes: int = 4, batch: int = 1) -> int:
    """Bytes one layer of ``QuantizedCache`` holds after ``tokens`` tokens: codes
    (``bits / 8`` bytes per value), a float16 scale and zero point per group (keys: per channel
    per block of ``group_size`` tokens; values: per token per ``group_size`` channels), and the
    full-precision tail (``dtype_bytes`` per value)."""
    quantized = max(tokens - residual, 0) // group_size * group_size  # tokens in full blocks
    tail = tokens - quantized
    per_value = bits / 8 + 2 * SCALE_DTYPE.itemsize / group_size  # code + its share of a group
    keys_and_values = 2 * batch * kv_heads * head_dim
    return int(keys_and_values * (quantized * per_value + tail * dtype_bytes))


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be 8, 4 or 2 (one, two or four values per byte), got "
                         f"{bits!r}")


def check_group_size(group_size: int, head_dim: int, bits: int) -> None:
    if not isinstance(group_size, int) or group_size <= 0 or head_dim % group_size:
        fits = [g for g in (8, 16, 32, 64, 128) if head_dim % g == 0]
        raise ValueError(
            f"group_size must divide head_dim ({head_dim}): each token's values are quantized in "
            f"groups of group_size channels; got {group_size!r}, try one of {fits or [head_dim]}")
    if head_dim % (8 // bits):
        raise ValueError(f"{bits}-bit codes pack {8 // bits} channels per byte: head_dim "
                         f"({head_dim}) must be a multiple of {8 // bits}")


# ---- the caches ----------------------------------------------------------------------------------

class BFloat16Cache(ConcatCache):
    """Keys and values stored in bfloat16 (2 bytes each), handed to attention in the model's
    dtype: the rounding of a 16-bit cache without changing the model."""

    name = "bf16"
    traits = Traits()  # a left-padded batch is tested with the plain caches only

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        k, v = super().update(keys.to(torch.bfloat16), values.to(torch.bfloat16))
        return k.to(keys.dtype), v.to(values.dtype)


class QuantizedCache(KVCache):
    """int8 or int4 keys (per channel) and values (per token), the newest tokens in full precision.

    Tokens arrive in a full-precision *tail*. Whenever the tail holds ``group_size`` tokens more
    than ``residual``, its oldest ``group_size`` tokens are quantized as one block and appended to
    the store: keys with a scale and zero point per channel (over the block's tokens), values
    with one per group of ``group_size`` channels of each token. ``update`` returns every token
    in the model's dtype: the store dequantized, then the tail, so the tokens of a call are
    always seen in full precision by that call (a prompt attends to itself unquantized, as in
    KIVI). Dequantizing the store at every step is the price of not having a fused kernel.
    """

    name = "quantized"
    traits = Traits(rolls_back=False)  # every token in order; crop only within the tail
    options_hint = ("the quantized cache keeps every token: it takes residual= (the newest "
                    "tokens kept in full precision)")

    @classmethod
    def for_layer(cls, layer: LayerSpec, bits: int = 8, group_size: int | None = None,
                  residual: int = 0) -> QuantizedCache:
        """Groups of ``group_size`` channels (default: KIVI's 32, or the head size if smaller)
        must divide the layer's head size."""
        group_size = min(GROUP_SIZE, layer.head_dim) if group_size is None else group_size
        check_bits(bits)
        check_group_size(group_size, layer.head_dim, bits)
        return cls(bits, group_size, residual)

    def __init__(self, bits: int = 8, group_size: int = GROUP_SIZE, residual: int = 0) -> None:
        super().__init__()
        check_bits(bits)
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive number, got {group_size!r}")
        if not isinstance(residual, int) or residual < 0:
            raise ValueError(f"residual must be 0 or more tokens, got {residual!r}")
        self.bits, self.group_size, self.residual = bits, group_size, residual
        for name in ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale",
                     "value_zero", "tail_keys", "tail_values"):
            self.register_buffer(name, None, persistent=False)
        # key_codes, value_codes: (B, H, Tq, D * bits / 8) uint8 (packed below 8 bits)
        # key_scale, key_zero: (B, H, Tq/G, D); value_scale, value_zero: (B, H, Tq, D/G)
        # tail_keys, tail_values: (B, H, T_tail, D) in the model's dtype

    @property
    def quantized_tokens(self) -> int:
        """Tokens in the quantized store (the rest are in the full-precision tail)."""
        return 0 if self.key_codes is None else self.key_codes.shape[2]

    def reset(self) -> None:
        super().reset()
        for name in ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale",
                     "value_zero", "tail_keys", "tail_values"):
            setattr(self, name, None)

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self._check(keys, values, self.tail_keys)
        if self.seen == 0:
            self.reset()
            check_group_size(self.group_size, keys.shape[3], self.bits)
            tail_k, tail_v = keys, values
        else:
            tail_k = torch.cat([self.tail_keys, keys], dim=2)  # (B, H, T_tail, D)
            tail_v = torch.cat([self.tail_values, values], dim=2)
        if self.key_codes is None:
            out_k, out_v = tail_k, tail_v
        else:  # (B, H, Tq + T_tail, D): the store dequantized, then the tail
            out_k = torch.cat([self.dequantized_keys(keys.dtype), tail_k], dim=2)
            out_v = torch.cat([self.dequantized_values(values.dtype), tail_v], dim=2)
        G = self.group_size
        flush = max(tail_k.shape[2] - self.residual, 0) // G * G  # whole blocks leave the tail
        if flush:
            self._store(tail_k[:, :, :flush], tail_v[:, :, :flush])
            tail_k, tail_v = tail_k[:, :, flush:].clone(), tail_v[:, :, flush:].clone()
        self.tail_keys, self.tail_values = tail_k, tail_v
        self.seen += keys.shape[2]
        return out_k, out_v

    def crop(self, n: int) -> None:
        """Roll back within the full-precision tail, to ``n`` tokens if a fresh cache given
        those ``n`` at once would have quantized the same blocks; quantized blocks cannot be cut
        back to full precision."""
        n, q, G = self._kept(n), self.quantized_tokens, self.group_size
        fresh = max(n - self.residual, 0) // G * G  # what a prefill of n tokens quantizes
        if n < self.seen and fresh != q:
            raise ValueError(
                f"the first {q} tokens are quantized (in blocks of {G}), and a fresh cache given "
                f"{n} tokens would have quantized {fresh} (keeping the newest {self.residual} "
                f"in full precision): crop can cut only the full-precision tail, to no fewer "
                f"than {q + self.residual} tokens, not {n}; a larger residual= leaves more room")
        if n < self.seen:
            self.tail_keys = self.tail_keys[:, :, : n - q]
            self.tail_values = self.tail_values[:, :, : n - q]
        self.seen = n

    def _store(self, keys: Tensor, values: Tensor) -> None:
        """Quantize ``(B, H, n * G, D)`` keys per channel and values per token; append them."""
        G = self.group_size
        kc, ks, kz = quantize(keys, self.bits, G, dim=2)  # scales (B, H, n, D): per channel
        vc, vs, vz = quantize(values, self.bits, G, dim=3)  # scales (B, H, n * G, D/G)
        if self.bits < 8:
            kc, vc = pack(kc, self.bits), pack(vc, self.bits)
        new = {"key_codes": kc, "key_scale": ks, "key_zero": kz,
               "value_codes": vc, "value_scale": vs, "value_zero": vz}
        for name, t in new.items():
            held = getattr(self, name)
            setattr(self, name, t if held is None else torch.cat([held, t], dim=2))

    def _codes(self, codes: Tensor) -> Tensor:
        return unpack(codes, self.bits) if self.bits < 8 else codes

    def dequantized_keys(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The quantized keys ``(B, H, Tq, D)`` as numbers again."""
        return dequantize(self._codes(self.key_codes), self.key_scale, self.key_zero,
                          self.group_size, dim=2, dtype=dtype)

    def dequantized_values(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The quantized values ``(B, H, Tq, D)`` as numbers again."""
        return dequantize(self._codes(self.value_codes), self.value_scale, self.value_zero,
                          self.group_size, dim=3, dtype=dtype)


class EvictCache(KVCache):
    """At most ``budget`` tokens per head: ``n_sink`` sinks, the last ``window`` tokens, and the
    heavy hitters by accumulated attention between them (H2O).

    Until the cache is full it fills like ``PreallocCache`` (any number of tokens per call). Once
    full it takes one token per call: the new token overwrites, in each head on its own, the held
    token with the least attention summed so far that is neither a sink nor in the recent window.
    ``observe`` adds each step's attention weights to those sums; ``attend`` calls it because
    its traits say ``needs_scores``. Keys carry their positions (rotated by RoPE, or GPT-2's learned
    positions added before the first layer), so slot order does not matter.
    """

    name = "evict"
    traits = Traits(needs_scores=True, one_token_when_full=True, reuses_slots=True,
                    rolls_back=False)

    @classmethod
    def for_layer(cls, layer: LayerSpec, budget: int | None = None, n_sink: int = N_SINK,
                  window: int | None = None) -> EvictCache:
        if budget is None:
            raise ValueError("the 'evict' cache needs a budget, the most tokens it keeps, e.g. "
                             "budget=64 (with n_sink= sinks and a recent window=)")
        return cls(budget, n_sink, window)

    def __init__(self, budget: int, n_sink: int = N_SINK, window: int | None = None) -> None:
        super().__init__()
        if window is None:
            window = max((budget - n_sink) // 2, 1)  # H2O: half heavy hitters, half recent
        if n_sink < 0 or window <= 0:
            raise ValueError(f"n_sink must be 0 or more and window 1 or more tokens, got "
                             f"n_sink={n_sink}, window={window}")
        if budget < n_sink + window:
            raise ValueError(f"budget ({budget}) must hold the {n_sink} sinks and the window of "
                             f"{window}: make budget at least {n_sink + window}, or shrink "
                             "n_sink or window")
        self.budget, self.n_sink, self.recent = budget, n_sink, window
        self.register_buffer("keys", None, persistent=False)  # (B, H, budget, D)
        self.register_buffer("values", None, persistent=False)
        self.register_buffer("positions", None, persistent=False)  # (B, H, budget) int32
        self.register_buffer("scores", None, persistent=False)  # (B, H, budget) float32

    @property
    def capacity(self) -> int | None:
        return self.budget

    def slot_positions(self) -> list[int]:
        """The position of the token in each slot of the first sequence's first head."""
        if self.positions is None:
            return []
        n = min(self.seen, self.budget)
        return [int(p) if s < n else -1 for s, p in enumerate(self.positions[0, 0])]

    def crop(self, n: int) -> None:
        """Eviction cannot roll back: the attention the rejected tokens paid is in the scores
        that decide what goes next, and what they evicted is gone."""
        if self._kept(n) < self.seen:
            raise ValueError("EvictCache cannot roll back: its heavy-hitter scores hold the "
                             "attention of every token it has seen, and what it evicted is "
                             "gone; generate again from the kept text (or use another cache)")

    def held_positions(self) -> Tensor:
        """``(B, H, tokens_held)``: the positions each head holds, sorted."""
        return self.positions[:, :, : self.tokens_held].sort(dim=-1).values

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self._check(keys, values, self.keys)
        start, T = self.seen, keys.shape[2]
        B, H, _, D = keys.shape
        if start == 0:
            self._allocate(keys, self.budget)
            self.positions = torch.empty(B, H, self.budget, dtype=torch.int32, device=keys.device)
            self.scores = torch.zeros(B, H, self.budget, device=keys.device)
        end = start + T
        if end <= self.budget:  # still filling: append, as PreallocCache does
            self.keys[:, :, start:end] = keys
            self.values[:, :, start:end] = values
            self.positions[:, :, start:end] = torch.arange(start, end, device=keys.device)
            self.scores[:, :, start:end] = 0
            self.seen = end
            return self.keys[:, :, :end], self.values[:, :, :end]
        if T > 1:
            raise ValueError(
                f"EvictCache holds {start} tokens and is full (budget {self.budget}): past that "
                f"it takes one token per call, got {T}. Feed them one at a time "
                "(kvlib.generate and kvlib.perplexity do) or call model.reset_kv_cache()")
        slot = self.victims()[..., None]  # (B, H, 1): the slot each head gives up
        self.keys.scatter_(2, slot[..., None].expand(B, H, 1, D), keys)
        self.values.scatter_(2, slot[..., None].expand(B, H, 1, D), values)
        self.positions.scatter_(2, slot, start)
        self.scores.scatter_(2, slot, 0.0)
        self.seen = end
        return self.keys, self.values

    def victims(self) -> Tensor:
        """``(B, H)``: in each head, the slot of the token with the least accumulated attention
        among those that are neither sinks nor among the last ``window`` (the new token
        included)."""
        newest = self.seen  # the position of the token about to be written
        protected = (self.positions < self.n_sink) | (self.positions > newest - self.recent)
        return self.scores.masked_fill(protected, float("inf")).argmin(dim=-1)

    def observe(self, weights: Tensor) -> None:
        """Add attention weights ``(B, H_q, T, S)`` (the queries of one call over the ``S``
        slots ``update`` returned) to each slot's sum, the query heads of a group together."""
        B, Hq, T, S = weights.shape
        H = self.scores.shape[1]
        received = weights.float().sum(dim=2).view(B, H, Hq // H, S).sum(dim=2)  # (B, H, S)
        self.scores[:, :, :S] += received
