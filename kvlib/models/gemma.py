"""Gemma 3's text model: local and global layers, each with its own cache.

What changes against Llama (``llama.py``), whose attention, RoPE table and SwiGLU shape it
reuses:

- **Local and global layers.** Five layers in six are *local*: each query sees only the last
  ``sliding_window`` tokens (its own included); every sixth is *global* and sees every earlier
  token (``layer_types``, or ``sliding_window_pattern``: layer i is global when ``(i + 1) %
  pattern == 0``). A local layer never needs more than its window of keys, so its cache is a ring
  of that window whatever strategy the global layers get: each layer says its ``window`` in its
  ``LayerSpec`` and ``kvlib.caches.build`` does the rest (``set_kv_cache("prealloc")`` holds
  ``window`` tokens in local layers and every token in global ones).
- **Two RoPE bases**: local layers rotate with ``rope_local_theta`` (10 000), global ones with
  ``rope_theta`` (1 000 000), optionally slowed ``rope_scaling_factor`` times (``"linear"``).
- **QK-norm** and Gemma's **RMSNorm**, which scales by ``1 + weight`` (the weights start at 0),
  around both halves of every block: four norms per layer (input, post-attention,
  pre-feedforward, post-feedforward).
- Scores are scaled by ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``; the token
  embedding is multiplied by ``sqrt(emb_dim)``; the gated MLP uses GELU (tanh approximation).
- Optional tanh soft-capping, ``cap * tanh(x / cap)``: of the final logits (``final_softcap``)
  and of the attention scores (``attn_softcap``, Gemma 2's; transformers' Gemma 3 ignores it,
  so ``kvlib.hf.gemma`` refuses a checkpoint that sets it).

Module names are transformers' ``Gemma3ForCausalLM``'s, less the ``model.`` prefix
(``kvlib.hf.gemma``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..caches import LayerSpec
from .base import CausalLM, attend_with, check_token_ids
from .llama import GroupedQueryAttention, RotaryEmbedding, SwiGLU

LOCAL, GLOBAL = "sliding_attention", "full_attention"  # transformers' layer_types


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int = 262144
    context_length: int = 32768  # HF: max_position_embeddings (RoPE: not a hard limit)
    emb_dim: int = 1152  # HF: hidden_size
    n_heads: int = 4
    n_kv_heads: int = 1
    n_layers: int = 26
    ffn_dim: int = 6912  # HF: intermediate_size
    head_dim: int = 256
    sliding_window: int = 512  # tokens a local layer's query sees, its own included
    layer_types: tuple[str, ...] | None = None  # None: from sliding_window_pattern
    sliding_window_pattern: int = 6  # every 6th layer global (5 local : 1 global)
    rope_theta: float = 1000000.0  # global layers
    rope_local_theta: float = 10000.0  # local layers (HF: rope_local_base_freq)
    rope_scaling_factor: float | None = None  # global layers' linear RoPE scaling
    query_pre_attn_scalar: int = 256  # scores are scaled by its -1/2 power
    attn_softcap: float | None = None  # HF: attn_logit_softcapping
    final_softcap: float | None = None  # HF: final_logit_softcapping
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qk_norm = True  # always (read by llama's GroupedQueryAttention); not a field

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_kv_heads",
                     "n_layers", "ffn_dim", "head_dim", "sliding_window",
                     "sliding_window_pattern"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads "
                             f"({self.n_heads}) and head_dim ({self.head_dim}) must be even")
        types = self.layer_types
        if types is None:
            p = self.sliding_window_pattern
            types = [GLOBAL if (i + 1) % p == 0 else LOCAL for i in range(self.n_layers)]
        types = tuple(types)
        if len(types) != self.n_layers or not set(types) <= {LOCAL, GLOBAL}:
            raise ValueError(f"layer_types must give each of the {self.n_layers} layers "
                             f"{LOCAL!r} or {GLOBAL!r}, got {types}")
        object.__setattr__(self, "layer_types", types)
        for name in ("rope_theta", "rope_local_theta", "query_pre_attn_scalar", "rms_norm_eps",
                     "rope_scaling_factor", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or None where optional), got "
                                 f"{value!r}")

    def window(self, layer: int) -> int | None:
        """The window of layer ``layer``: ``sliding_window`` if local, None if global."""
        return self.sliding_window if self.layer_types[layer] == LOCAL else None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GemmaConfig:
        """A named configuration (``from_preset("tiny-gemma3")``); keywords override fields."""
        if name not in GEMMA_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(GEMMA_PRESETS)}")
        return replace(GEMMA_PRESETS[name], **overrides)


GEMMA_PRESETS: dict[str, GemmaConfig] = {
    "gemma-3-1b": GemmaConfig(),  # google/gemma-3-1b-pt, text only
    "gemma-3-270m": GemmaConfig(emb_dim=640, n_layers=18, ffn_dim=2048),  # google/gemma-3-270m
    # Small enough for tests: GPT-2's vocabulary (kvlib's tokenizer works), a window of 16 that
    # bites within a short text, and layer 5 global.
    "tiny-gemma3": GemmaConfig(vocab_size=50257, context_length=256, emb_dim=64, n_heads=4,
                               n_kv_heads=2, n_layers=6, ffn_dim=192, head_dim=16,
                               sliding_window=16, query_pre_attn_scalar=16),
}


class GemmaRotaryEmbedding(RotaryEmbedding):
    """Llama's cos/sin table with a base of its own, its frequencies divided by ``factor``
    (transformers' ``"linear"`` scaling: positions ``factor`` times slower)."""

    def __init__(self, cfg: GemmaConfig, theta: float, factor: float | None = None) -> None:
        self.factor = factor  # read by inv_freq, which the table's build calls
        super().__init__(cfg.head_dim, theta, cfg.context_length)

    @property
    def inv_freq(self) -> Tensor:
        inv_freq = super().inv_freq  # (D/2,)
        return inv_freq if self.factor is None else inv_freq / self.factor


class GemmaRMSNorm(nn.Module):
    """``x / rms(x) * (1 + weight)``, in float32 and cast back after the product, as
    transformers' Gemma computes it (Llama casts before)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))  # 0: the identity scale
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(GroupedQueryAttention):
    """Llama's grouped-query attention with QK-norm, Gemma's norms, scale and optional
    soft-capping, over a window of its own if the layer is local (``window``), with or without
    a cache."""

    def __init__(self, cfg: GemmaConfig, window: int | None) -> None:
        super().__init__(cfg)  # projections without bias, as Gemma 3's
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.window, self.softcap = window, cfg.attn_softcap
        self.scale = cfg.query_pre_attn_scalar**-0.5

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, use_cache: bool = False) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)  # (B, H, T, D), (B, H_kv, T, D) x 2
        y = attend_with(q, k, v, self.kv_cache if use_cache else None, window=self.window,
                        scale=self.scale, softcap=self.softcap)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class GeluMLP(SwiGLU):
    """Llama's gated MLP with GELU (tanh approximation) in place of SiLU."""

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, window: int | None) -> None:
        super().__init__()
        C, eps = cfg.emb_dim, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(C, eps)
        self.self_attn = GemmaAttention(cfg, window)
        self.post_attention_layernorm = GemmaRMSNorm(C, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(C, eps)
        self.mlp = GeluMLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(C, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, use_cache: bool = False) -> Tensor:
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, use_cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(x / cap)``: ``x`` squashed smoothly into ``(-cap, cap)`` (None: ``x``)."""
    return x if cap is None else cap * torch.tanh(x / cap)


class GemmaModel(CausalLM):
    hard_context = False  # RoPE: positions go on past context_length (with a warning)

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, cfg.window(i))
                                    for i in range(cfg.n_layers))
        self.norm = GemmaRMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.rope_local = GemmaRotaryEmbedding(cfg, cfg.rope_local_theta)  # tables, no weights
        self.rope_global = GemmaRotaryEmbedding(cfg, cfg.rope_theta, cfg.rope_scaling_factor)
        for module in self.modules():  # transformers' init: normal(0, 0.02), norm weights 0
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        self.arrange_weights()  # the fast layout for decoding (see CausalLM.arrange_weights)
        self.set_kv_cache()  # growing caches on global layers, rings on local ones

    def layer_specs(self) -> list[LayerSpec]:
        """Every layer caches its ``n_kv_heads`` heads; a local layer says its window and
        rotates with the local base."""
        c = self.cfg
        return [LayerSpec(c.n_kv_heads, c.head_dim, c.context_length,
                          (self.rope_local if c.window(i) else self.rope_global).inv_freq,
                          window=c.window(i)) for i in range(c.n_layers)]

    def weight_matrices(self) -> list[nn.Module]:
        """Every linear layer and the token embedding, less the head when it is tied to it."""
        tied = self.cfg.tie_embeddings
        linears = [m for m in self.modules()
                   if isinstance(m, nn.Linear) and not (tied and m is self.lm_head)]
        return [*linears, self.embed_tokens]

    def tie_head(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope_tables(self, start: int, rows: Tensor | None, T: int, like: Tensor
                    ) -> dict[bool, tuple[Tensor, Tensor]]:
        """cos and sin of the ``T`` positions for local (True) and global (False) layers."""
        ropes = {True: self.rope_local, False: self.rope_global}
        if rows is None:
            return {local: r(start, T, like=like) for local, r in ropes.items()}  # (T, D)
        return {local: r.at(rows, like=like) for local, r in ropes.items()}  # (B, 1, T, D)

    def forward(self, idx: Tensor, use_cache: bool = False, last_only: bool = False,
                check_ids: bool = True, logits_at: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, vocab)`` for token ids ``(B, T)``; ``(B, 1, vocab)`` if
        ``last_only``. Positions as in ``LlamaModel.forward``."""
        if check_ids:
            check_token_ids(idx, self.cfg.vocab_size)
        B, T = idx.shape
        start, rows = self.positions(T, use_cache)  # past context_length: one warning
        x = self.embed_tokens(idx)  # (B, T, C)
        x = x * torch.tensor(self.cfg.emb_dim**0.5, dtype=x.dtype)  # rounded as transformers
        tables = self.rope_tables(start, rows, T, x)
        for layer in self.layers:
            cos, sin = tables[layer.self_attn.window is not None]
            x = layer(x, cos, sin, use_cache)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        elif logits_at is not None:  # (K,): only these tokens' logits (kvlib.Engine)
            x = x[:, logits_at]  # (B, K, C)
        return softcap(self.lm_head(self.norm(x)), self.cfg.final_softcap)  # (B, T or 1, V)
