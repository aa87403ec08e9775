"""The GPT-2 architecture, with a KV cache in every attention layer.

Exactly GPT-2: learned position embeddings, pre-LayerNorm blocks (eps 1e-5), a fused QKV projection
with bias, GELU with the tanh approximation, and an output head tied to the token embedding, so the
released GPT-2 weights load without changes (see ``kvlib.pretrained``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import STRATEGIES, ConcatCache, KVCache, attention_mask
from .config import GPTConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.dropout = cfg.dropout
        self.kv_cache: KVCache = ConcatCache()  # this layer's keys and values; see kvlib.cache

    def forward(self, x: Tensor, use_cache: bool = False) -> Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)

        window = None
        if use_cache:  # store the new keys/values; attend over what the cache returns
            cache = self.kv_cache
            k, v = cache.update(k, v)  # (B, H, S, D), S >= T
            window = cache.window
        S = k.shape[2]
        dropout = self.dropout if self.training else 0.0
        if (T == 1 or T == S) and (window is None or S <= window):
            # a decode step (one query sees every key) or a prefill (plain causal): no mask work
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:  # the queries are the last T of S positions, or a window hides the oldest keys
            mask = attention_mask(T, S, window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return F.dropout(y, self.dropout) if self.training else y


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        x = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return F.dropout(x, self.dropout) if self.training else x


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, use_cache: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), use_cache)
        return x + self.mlp(self.ln_2(x))


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)  # token embeddings
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)  # learned positions
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.pos = 0  # position counter: where the next token goes after the cached ones
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        self.transpose_weight_storage()

    def transpose_weight_storage(self) -> None:
        """Keep every weight matrix (and the tied head) transposed in memory: same values, same
        ``(out, in)`` shape, so nothing else changes.

        A decode step multiplies one token's vector by every matrix: ``F.linear(x, W)`` computes
        ``x @ W.T``, and when ``W.T`` is a contiguous ``(in, out)`` array the CPU's BLAS streams it
        faster than a contiguous ``W`` (kvlib.bench, gpt2 on one core: a decode step 39 -> 31 ms;
        the 50257-row head alone 9.8 -> 5.7 ms). Hugging Face's GPT-2 stores its projections so
        (``Conv1D``). A lookup in the token embedding then reads a strided row, which costs
        next to nothing.
        """
        for module in [*(m for m in self.modules() if isinstance(m, nn.Linear)), self.wte]:
            if module is not self.lm_head:  # the head is wte's weight
                module.weight = nn.Parameter(module.weight.detach().t().contiguous().t())
        self.lm_head.weight = self.wte.weight  # tie again

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> GPTModel:
        """OpenAI's GPT-2 weights ("gpt2", "gpt2-medium", ...) or a local safetensors file."""
        from .pretrained import from_pretrained

        return from_pretrained(name_or_path)

    @property
    def caches(self) -> list[KVCache]:
        return [block.attn.kv_cache for block in self.h]

    def set_kv_cache(self, strategy: str = "concat", *, max_len: int | None = None,
                     window: int | None = None) -> None:
        """Give every attention layer a fresh cache of one strategy (see ``kvlib.cache``).

        ``max_len`` sizes "prealloc" (default: the context length); ``window`` is required by
        "sliding" and optional for "none" (a no-cache model masked to the same window).
        """
        ctx = self.cfg.context_length
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown cache {strategy!r}; choose one of {list(STRATEGIES)}")
        if window is not None and not 0 < window <= ctx:
            raise ValueError(
                f"window must be between 1 and the context length ({ctx} tokens), got {window}"
            )
        if strategy == "sliding" and window is None:
            raise ValueError("the sliding cache needs a window, e.g. window=256")
        if strategy in ("concat", "prealloc") and window is not None:
            raise ValueError(f"window applies to 'sliding' (or 'none'), not {strategy!r}")
        kwargs = {"none": {"window": window}, "concat": {}, "sliding": {"window": window},
                  "prealloc": {"max_len": max_len or ctx}}[strategy]
        p = next(self.parameters())
        for block in self.h:
            block.attn.kv_cache = STRATEGIES[strategy](**kwargs).to(p.device)
        self.pos = 0

    def reset_kv_cache(self) -> None:
        """Forget every cached token in every layer and restart the position counter."""
        for cache in self.caches:
            cache.reset()
        self.pos = 0

    @property
    def kv_cache_nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.caches)

    def forward(self, idx: Tensor, use_cache: bool = False, last_only: bool = False,
                check_ids: bool = True) -> Tensor:
        """Logits ``(B, T, vocab)`` for token ids ``(B, T)``; ``(B, 1, vocab)`` if ``last_only``.

        With ``use_cache`` the tokens continue the cached ones: the first call fills the caches,
        later calls append, and positions start at the counter ``self.pos``. ``check_ids=False``
        skips the range check, for a loop that feeds back tokens the model itself produced.
        """
        if check_ids:
            check_token_ids(idx, self.cfg.vocab_size)
        B, T = idx.shape
        start = self.pos if use_cache else 0
        if start + T > self.cfg.context_length:
            raise ValueError(
                f"GPT-2 has {self.cfg.context_length} learned positions but this call needs "
                f"positions {start}..{start + T - 1}: "
                + ("call model.reset_kv_cache() or generate fewer tokens" if use_cache and start
                   else "crop the input to the last context_length tokens")
            )
        pos_emb = self.wpe.weight[start : start + T]  # (T, C): the positions are consecutive
        x = self.wte(idx) + pos_emb  # (B, T, C)
        if self.training:
            x = F.dropout(x, self.cfg.dropout)
        for block in self.h:
            x = block(x, use_cache)
        if use_cache:
            self.pos += T
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C): generation needs only the next token's logits
        return self.lm_head(self.ln_f(x))  # (B, T or 1, vocab)


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
