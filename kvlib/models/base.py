"""What every kvlib model shares: the cache plumbing, cached attention and the id check.

A model family (``gpt2.py``, ``llama.py``) writes its own blocks and ``forward`` and says what
its attention layers are (``layer_specs``); it inherits ``set_kv_cache``, ``using``,
``reset_kv_cache``, ``caches`` and ``kv_cache_nbytes`` from ``CausalLM``, and every attention
layer calls ``attend`` with its queries, keys and values, so each cache strategy works with each
family unchanged. No model names a strategy: ``kvlib.caches.build`` makes them. A layer whose
attention is more than plain causal attention (a window of its own, another scale, soft-capped
scores, learned sinks: ``gemma.py``, ``llama.py``'s ``attn_sinks``) calls ``attend_with``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..caches import KVCache, LayerSpec, attention_mask, build


class CachedAttention(nn.Module):
    """Base of every attention layer: it owns one cache, ``self.kv_cache`` (the model gives it
    one with ``set_kv_cache``; see ``kvlib.caches``)."""

    def __init__(self) -> None:
        super().__init__()
        self.kv_cache: KVCache | None = None  # this layer's keys and values


def attend(q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, dropout: float = 0.0
           ) -> Tensor:
    """Causal attention of the new queries ``(B, H, T, D)`` over the cache and the new keys.

    ``k`` and ``v`` are the new tokens' ``(B, H_kv, T, D)``; ``H_kv`` may divide ``H``
    (grouped-query attention: every ``H / H_kv`` query heads share one key/value head). With a
    ``cache`` the new keys and values are stored first and attention runs over what
    ``cache.update`` returns.
    """
    if cache is not None and cache.traits.needs_scores:  # eviction (H2O) reads the weights
        return scored_attention(q, k, v, cache)
    window, mask = None, None
    B, H, T, D = q.shape
    if cache is not None and T == 1 and dropout == 0.0 \
            and (y := cache.attend_in_place(q, k, v)) is not None:
        return y  # a cache that reads its storage where it lies (paged blocks)
    if cache is not None:
        k, v = cache.update(k, v)  # (B, H_kv, S, D), S >= T
        window = cache.window
        mask = cache.batch_mask(T, k.shape[2])  # rows at different lengths: (B, 1, T, S)
    S, H_kv = k.shape[2], k.shape[1]
    if T == 1 and H_kv != H and (window is None or S <= window):
        # A GQA decode step: the group's queries become rows of one query block per kv head, so
        # the shared keys are read as they lie, never repeated: (B, H_kv, G, D) against S keys.
        y = F.scaled_dot_product_attention(q.reshape(B, H_kv, H // H_kv, D), k, v,
                                           attn_mask=mask, dropout_p=dropout)
        return y.view(B, H, 1, D)
    gqa = H_kv != H
    if mask is None and (T == 1 or T == S) and (window is None or S <= window):
        # a decode step (one query sees every key) or a prefill (plain causal): no mask work
        causal = True if T > 1 else False  # a bool, also when compiled with T symbolic
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal,
                                              enable_gqa=gqa)
    if mask is None:  # the queries are the last T of S positions, or a window hides the oldest
        mask = attention_mask(T, S, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          enable_gqa=gqa)


def scored_attention(q: Tensor, k: Tensor, v: Tensor, cache: KVCache) -> Tensor:
    """Causal attention written out, for a cache that needs the softmax weights
    (``cache.observe``, H2O's eviction): the fused kernel never forms them, so this costs a
    ``(B, H, T, S)`` tensor and a slower step."""
    k, v = cache.update(k, v)  # (B, H_kv, S, D)
    B, H, T, D = q.shape
    S, H_kv = k.shape[2], k.shape[1]
    k = k.repeat_interleave(H // H_kv, dim=1)  # (B, H, S, D): each kv head for its query group
    v = v.repeat_interleave(H // H_kv, dim=1)
    scores = q @ k.transpose(-2, -1) / D**0.5  # (B, H, T, S)
    mask = attention_mask(T, S, None, q.device)  # the queries are the last T of S positions
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)  # (B, H, T, S)
    cache.observe(weights)
    return weights @ v  # (B, H, T, D)


def attend_with(q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, *,
                window: int | None = None, scale: float | None = None,
                softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """``attend`` for layers that need more than plain causal attention: a sliding ``window``
    of their own (a local layer, with or without a cache), another ``scale`` than
    ``1 / sqrt(D)`` (Gemma's ``query_pre_attn_scalar``), tanh ``softcap``ping of the scores
    (``softcap * tanh(scores / softcap)``), or a learned sink logit per query head, ``sinks``
    ``(H,)`` (gpt-oss: ``softmax([scores, sink])`` without its last column, so a head may give
    part of its attention to nothing). The fused kernel takes the first two; the others are
    written out (``written_attention``). Shapes as for ``attend``.
    """
    B, H, T, D = q.shape
    mask = None
    if cache is not None:
        k, v = cache.update(k, v)  # (B, H_kv, S, D)
        held = [w for w in (window, cache.window) if w is not None]  # the narrower one wins
        window = min(held) if held else None
        mask = cache.batch_mask(T, k.shape[2])  # rows at different lengths: (B, 1, T, S)
    S = k.shape[2]
    causal = attention_mask(T, S, window, q.device)  # (T, S), None for a decode step
    if mask is None or causal is None:
        mask = causal if mask is None else mask
    else:
        mask = mask & causal  # (B, 1, T, S)
    written = softcap is not None or sinks is not None
    if cache is not None and cache.traits.needs_scores or written:
        return written_attention(q, k, v, mask, cache, scale, softcap, sinks)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=k.shape[1] != H)


def written_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                      cache: KVCache | None = None, scale: float | None = None,
                      softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """Attention written out, of queries ``(B, H, T, D)`` over keys and values
    ``(B, H_kv, S, D)`` (``mask``: True where a query may look): the weights of
    ``attention_weights``, handed to a cache that needs them (H2O), times the values."""
    weights = attention_weights(q, k, mask, scale, softcap, sinks)  # (B, H, T, S)
    if cache is not None and cache.traits.needs_scores:
        cache.observe(weights)
    return weights @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # (B, H, T, D)


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None, scale: float | None = None,
                      softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """Softmax weights ``(B, H, T, S)``: scores scaled, soft-capped if ``softcap``, masked, then
    each head's sink logit joins them as one more column before the softmax and is dropped
    after it (a row then sums to less than one)."""
    B, H, T, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, S, D): each kv head for its group
    scores = q @ k.transpose(-2, -1) * (D**-0.5 if scale is None else scale)  # (B, H, T, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return scores.softmax(dim=-1)
    sink = sinks.to(scores.dtype).view(1, H, 1, 1).expand(B, H, T, 1)  # (B, H, T, 1)
    return torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]  # the sink dropped


class CausalLM(nn.Module):
    """The cache plumbing of a decoder-only model: one cache per attention layer, and the checks
    that the positions fit the model. The caches own the position: the next token goes at the
    first layer's ``get_seq_length()`` (``pos``), so resetting or replacing the caches moves it
    with them.

    ``hard_context`` says whether ``cfg.context_length`` is a wall (GPT-2's learned positions end
    there) or only the length the model was trained on (RoPE: positions go on, quality may not).
    """

    hard_context: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._warned_past_context = False

    @property
    def attention_layers(self) -> list[CachedAttention]:
        """Every attention layer, in order (found once: a decode step asks for them each time)."""
        found = self.__dict__.get("_attention_layers")
        if found is None:
            found = [m for m in self.modules() if isinstance(m, CachedAttention)]
            self.__dict__["_attention_layers"] = found
        return found

    @property
    def caches(self) -> list[KVCache]:
        return [layer.kv_cache for layer in self.attention_layers]

    @property
    def pos(self) -> int:
        """The position counter: where the next token goes, which is how many tokens the caches
        have taken since their reset (the first layer's ``get_seq_length()``)."""
        return self.caches[0].get_seq_length()

    def layer_specs(self) -> list[LayerSpec]:
        """What each attention layer's cache may need to know: heads, head size, context, RoPE
        frequencies. Each family says."""
        raise NotImplementedError

    def set_kv_cache(self, strategy: str = "concat", *, max_len: int | None = None,
                     window: int | None = None, **options) -> None:
        """Give every attention layer a fresh cache of one strategy (``kvlib.caches``: any name
        in ``kvlib.caches.STRATEGIES``, a reader's own too once registered).

        ``max_len`` sizes "prealloc" and "paged" (default: the context length) and is ignored by
        strategies that do not take it; ``window`` is required by "sliding", "sinks" and
        "recompute" and optional for "none" (a no-cache model masked to the same window) and
        "evict" (its recent window); ``options`` go to the cache class (``n_sink=`` for "sinks";
        ``bits=``, ``group_size=``, ``residual=`` for "quantized"; ``budget=``, ``n_sink=`` for
        "evict"; ``block_size=`` for "paged").

        A model with local layers (Gemma 3, gpt-oss: ``LayerSpec.window``) keeps a ring of its
        window in each of them whatever the strategy; the strategy and ``window=`` are the
        global layers' (``kvlib.caches.registry.with_local_layers``).
        """
        caches = build(strategy, self.layer_specs(), max_len=max_len, window=window, **options)
        device = next(self.parameters()).device
        for layer, cache in zip(self.attention_layers, caches, strict=True):
            layer.kv_cache = cache.to(device)

    @contextmanager
    def using(self, caches: Sequence[KVCache]) -> Iterator[CausalLM]:
        """``with model.using(caches): ...``: every attention layer uses ``caches[i]`` inside the
        block, and gets back the very cache object it had when the block ends, by an error too."""
        layers = self.attention_layers
        if len(caches) != len(layers):
            raise ValueError(f"the model has {len(layers)} attention layers but got "
                             f"{len(caches)} caches: give one per layer")
        saved = [layer.kv_cache for layer in layers]
        for layer, cache in zip(layers, caches, strict=True):
            layer.kv_cache = cache
        try:
            yield self
        finally:
            for layer, cache in zip(layers, saved, strict=True):
                layer.kv_cache = cache

    def set_padding(self, pad: Tensor | None) -> None:
        """Tell every cache how many padding tokens sit at the start of each row of the batch
        (``(B,)``; None: none). Positions then start at each row's first real token and no query
        attends to padding, so every row gets the tokens it would get alone. The padding stays
        with the caches (``reset_kv_cache`` keeps it) until ``set_kv_cache`` makes new ones."""
        if pad is not None:
            fixed = [c for c in self.caches if not c.traits.takes_padding or c.window is not None]
            if fixed:
                raise ValueError(
                    f"a padded batch needs caches that keep one position per slot and no window "
                    f"of their own, but this model has {type(fixed[0]).__name__} (window "
                    f"{fixed[0].window}) in {len(fixed)} layers: generate the prompts one at a "
                    "time, or give them equal lengths")
        for cache in self.caches:
            cache.pad = pad

    def reset_kv_cache(self) -> None:
        """Forget every cached token in every layer, which restarts the position counter."""
        for cache in self.caches:
            cache.reset()

    def crop_kv_cache(self, n: int) -> None:
        """Keep the first ``n`` cached tokens in every layer (``n < 0``: drop the last ``-n``);
        the position counter follows, since the caches own it. A cache that cannot roll back
        raises (see each strategy's ``crop``)."""
        for cache in self.caches:
            cache.crop(n)

    def weight_matrices(self) -> list[nn.Module]:
        """The modules whose ``weight`` is a matrix read on every decode step, except a head tied
        to the token embedding (the same tensor). Each family says which."""
        raise NotImplementedError

    def tie_head(self) -> None:
        """Point the output head at the token embedding again, where the family ties them."""

    def arrange_weights(self) -> None:
        """Lay every weight matrix out in memory as this device and dtype decode fastest; the
        values and the ``(out, in)`` shapes never change. ``kvlib.load_model`` calls it after
        casting or moving a model; call it yourself after ``model.to(...)``.

        A decode step multiplies one token's vector by every matrix: ``F.linear(x, W)`` computes
        ``x @ W.T``. In float32 on a CPU, BLAS streams ``W.T`` faster when it is a contiguous
        ``(in, out)`` array, so the matrices are kept transposed in memory (Hugging Face's GPT-2
        stores its projections so, as ``Conv1D``). bfloat16 and float16 kernels (oneDNN on a CPU)
        and GPUs want the usual row-major ``(out, in)``. ``python -m kvlib.bench`` measures both.
        """
        p = next(self.parameters())
        transposed = p.device.type == "cpu" and p.dtype == torch.float32
        for module in self.weight_matrices():
            w = module.weight.detach()
            if w.is_meta:
                continue
            w = w.t().contiguous().t() if transposed else w.contiguous()
            module.weight = nn.Parameter(w, requires_grad=module.weight.requires_grad)
        self.tie_head()

    @property
    def kv_cache_nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.caches)

    def positions(self, T: int, use_cache: bool) -> tuple[int, Tensor | None]:
        """Where the next ``T`` tokens go: the first position (the caches' length, or 0 without
        a cache) and, when the rows of a batch sit at different positions (padding, a paged
        batch), each row's positions ``(B, T)``. Checks them against the context."""
        if not use_cache:
            self.check_positions(0, T, use_cache)
            return 0, None
        cache = self.caches[0]
        start, rows = cache.get_seq_length(), cache.next_positions(T)  # rows: (B, T) or None
        if rows is None:
            self.check_positions(start, T, use_cache)
            return start, None
        self.check_positions(int(rows.max()) + 1 - T, T, use_cache)
        return start, rows

    def check_positions(self, start: int, T: int, use_cache: bool) -> None:
        """An error past a hard context (GPT-2), a warning, once, past a soft one (RoPE)."""
        ctx = self.cfg.context_length
        if start + T <= ctx:
            return
        if self.hard_context:
            raise ValueError(
                f"GPT-2 has {ctx} learned positions but this call needs positions "
                f"{start}..{start + T - 1}: "
                + ("call model.reset_kv_cache() or generate fewer tokens" if use_cache and start
                   else "crop the input to the last context_length tokens")
            )
        if not self._warned_past_context:
            self._warned_past_context = True
            warnings.warn(
                f"position {start + T - 1} is past the {ctx} tokens this model was trained on: "
                "RoPE keeps rotating, so nothing breaks, but quality usually drops there "
                "(a sliding window or attention sinks keep the positions the model knows)",
                stacklevel=4,
            )


def check_token_ids(idx: Tensor, vocab_size: int) -> None:
    """Raise a clear error for ids that are not a ``(batch, tokens)`` integer tensor in range."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"token ids must be a torch tensor, got {type(idx).__name__}; "
                        "use torch.tensor([ids])")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"token ids must be integers (torch.long), got {idx.dtype}")
    if idx.dim() != 2 or idx.numel() == 0:
        raise ValueError(f"token ids must have shape (batch, tokens) with at least one token, "
                         f"got shape {tuple(idx.shape)}")
    lo, hi = (int(t) for t in torch.aminmax(idx))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got values from {lo} to {hi}")
