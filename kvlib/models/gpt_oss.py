"""gpt-oss (OpenAI's open-weight models): learned attention sinks, local and global layers, a
mixture of experts.

What changes against Llama (``llama.py``), whose sink attention and RMSNorm it reuses:

- **Learned sinks**: every query head has one more logit, ``sinks[h]``, that joins its scores in
  the softmax and is dropped after it (``llama.SinkAttention``), and biases on the projections.
- **Local and global layers alternate**: even layers see the last ``sliding_window`` (128)
  tokens, odd ones every token. Each local layer's cache is a ring of its window whatever
  strategy the global layers get (``kvlib.caches.build``, as for Gemma 3).
- **A mixture of experts** instead of one MLP: a router picks ``experts_per_token`` of
  ``n_experts`` for each token and weighs their outputs by the softmax of its top logits; each
  expert is a gated MLP with clamped inputs (``swiglu_limit``), ``gate * sigmoid(alpha * gate)``
  times ``up + 1``.
- **YaRN** RoPE: slow rotations are interpolated ``factor`` times, fast ones kept, the ones in
  between blended, and cos and sin scaled by ``0.1 ln(factor) + 1``.

Module names are transformers' ``GptOssForCausalLM``'s, less the ``model.`` prefix
(``kvlib.hf.gpt_oss``); the experts' weights are stored ``(experts, in, out)``, as there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from ..caches import LayerSpec
from .base import CausalLM, check_token_ids
from .llama import RMSNorm, RotaryEmbedding, SinkAttention

LOCAL, GLOBAL = "sliding_attention", "full_attention"  # transformers' layer_types


@dataclass(frozen=True)
class YarnScaling:
    """YaRN's RoPE scaling (transformers' ``rope_type: "yarn"``), gpt-oss's values by default."""

    factor: float = 32.0
    beta_fast: float = 32.0  # rotations above which a frequency is kept (extrapolated)
    beta_slow: float = 1.0  # rotations below which it is interpolated
    original_context_length: int = 4096  # HF: original_max_position_embeddings
    truncate: bool = False  # round the blending range out to whole dimensions

    @property
    def attention_factor(self) -> float:
        """How much cos and sin are scaled: ``0.1 ln(factor) + 1`` (1 for no stretch)."""
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0


@dataclass(frozen=True)
class GptOssConfig:
    vocab_size: int = 201088
    context_length: int = 131072  # HF: max_position_embeddings
    emb_dim: int = 2880  # HF: hidden_size
    n_heads: int = 64
    n_kv_heads: int = 8
    n_layers: int = 24
    ffn_dim: int = 2880  # each expert's hidden size (HF: intermediate_size)
    head_dim: int = 64
    n_experts: int = 32  # HF: num_local_experts
    experts_per_token: int = 4  # HF: num_experts_per_tok
    sliding_window: int = 128
    layer_types: tuple[str, ...] | None = None  # None: local, global, local, ...
    rope_theta: float = 150000.0
    rope_scaling: YarnScaling | None = YarnScaling()  # a dict with the same keys is accepted
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    attention_bias: bool = True
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm = False  # read by llama's attention; not a field

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            names = {f.name for f in fields(YarnScaling)}
            if not set(self.rope_scaling) <= names:
                raise ValueError(f"rope_scaling keys must be among {sorted(names)}, "
                                 f"got {sorted(self.rope_scaling)}")
            object.__setattr__(self, "rope_scaling", YarnScaling(**self.rope_scaling))
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_kv_heads",
                     "n_layers", "ffn_dim", "head_dim", "n_experts", "experts_per_token",
                     "sliding_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads or self.head_dim % 2 \
                or self.experts_per_token > self.n_experts:
            raise ValueError("n_kv_heads must divide n_heads, head_dim be even and "
                             "experts_per_token at most n_experts")
        types = self.layer_types or [LOCAL if i % 2 == 0 else GLOBAL
                                     for i in range(self.n_layers)]
        if len(types) != self.n_layers or not set(types) <= {LOCAL, GLOBAL}:
            raise ValueError(f"layer_types must give each of the {self.n_layers} layers "
                             f"{LOCAL!r} or {GLOBAL!r}, got {types}")
        object.__setattr__(self, "layer_types", tuple(types))

    def window(self, layer: int) -> int | None:
        """The window of layer ``layer``: ``sliding_window`` if local, None if global."""
        return self.sliding_window if self.layer_types[layer] == LOCAL else None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GptOssConfig:
        if name not in GPT_OSS_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(GPT_OSS_PRESETS)}")
        return replace(GPT_OSS_PRESETS[name], **overrides)


GPT_OSS_PRESETS: dict[str, GptOssConfig] = {
    "gpt-oss-20b": GptOssConfig(),  # openai/gpt-oss-20b (its experts ship in MXFP4)
    "gpt-oss-120b": GptOssConfig(n_layers=36, n_experts=128),  # openai/gpt-oss-120b
    # Small enough for tests: GPT-2's vocabulary, a window of 16 that bites in a short text.
    "tiny-gpt-oss": GptOssConfig(vocab_size=50257, context_length=256, emb_dim=64, n_heads=4,
                                 n_kv_heads=2, n_layers=4, ffn_dim=64, head_dim=16, n_experts=4,
                                 experts_per_token=2, sliding_window=16,
                                 rope_scaling=YarnScaling(factor=4.0,
                                                          original_context_length=64)),
}


class YarnRotaryEmbedding(RotaryEmbedding):
    """Llama's cos/sin table with YaRN's frequencies, cos and sin scaled by its attention factor
    (in float32, then cast, as transformers does)."""

    @property
    def inv_freq(self) -> Tensor:
        D, theta, s = self.head_dim, float(self.theta), self.scaling
        pos_freqs = theta ** (torch.arange(0, D, 2).float() / D)  # (D/2,)
        if s is None:
            return 1.0 / pos_freqs
        def dim_of(rotations: float) -> float:  # the dimension that turns that many times
            return D * math.log(s.original_context_length / (rotations * 2 * math.pi)) / (
                2 * math.log(theta))
        low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, D - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: the fast dimensions, kept; 0: the slow ones, interpolated
        return 1.0 / (s.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep

    def angles(self, lo: int, hi: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        cos, sin = super().angles(lo, hi, device)  # float32
        f = 1.0 if self.scaling is None else self.scaling.attention_factor
        return (cos * f).to(dtype), (sin * f).to(dtype)


class OssAttention(SinkAttention):
    """Llama's sink attention with biased projections, over a window if the layer is local."""

    def __init__(self, cfg: GptOssConfig, window: int | None) -> None:
        super().__init__(cfg)
        self.window = window
        if cfg.attention_bias:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                old = getattr(self, name)
                setattr(self, name, nn.Linear(old.in_features, old.out_features, bias=True))


class Experts(nn.Module):
    """``n_experts`` gated MLPs, weights stacked ``(experts, in, out)``."""

    def __init__(self, cfg: GptOssConfig) -> None:
        super().__init__()
        E, C, F = cfg.n_experts, cfg.emb_dim, cfg.ffn_dim
        self.gate_up_proj = nn.Parameter(torch.zeros(E, C, 2 * F))  # gate and up interleaved
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * F))
        self.down_proj = nn.Parameter(torch.zeros(E, F, C))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, C))
        self.limit, self.alpha = cfg.swiglu_limit, cfg.swiglu_alpha

    def forward(self, x: Tensor, e: int) -> Tensor:
        """Expert ``e`` on tokens ``(N, C)``."""
        gate_up = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]  # (N, 2F)
        gate = gate_up[:, 0::2].clamp(max=self.limit)
        up = gate_up[:, 1::2].clamp(-self.limit, self.limit)
        h = (up + 1) * gate * torch.sigmoid(self.alpha * gate)  # (N, F)
        return h @ self.down_proj[e] + self.down_proj_bias[e]  # (N, C)


class MixtureOfExperts(nn.Module):
    def __init__(self, cfg: GptOssConfig) -> None:
        super().__init__()
        self.router = nn.Linear(cfg.emb_dim, cfg.n_experts)  # with a bias
        self.experts = Experts(cfg)
        self.k = cfg.experts_per_token

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C): each token routed on its own
        top, chosen = self.router(x).topk(self.k, dim=-1)  # (N, k) logits and expert ids
        weights = top.softmax(dim=-1)  # (N, k)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():  # each expert once, on the tokens that chose it
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            y = self.experts(x[rows], e) * weights[rows, slot, None]
            out.index_add_(0, rows, y.to(x.dtype))
        return out.view(B, T, C)


class OssDecoderLayer(nn.Module):
    def __init__(self, cfg: GptOssConfig, window: int | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.self_attn = OssAttention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.mlp = MixtureOfExperts(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, use_cache: bool = False) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, use_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssModel(CausalLM):
    hard_context = False  # RoPE: positions go on past context_length (with a warning)

    def __init__(self, cfg: GptOssConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.layers = nn.ModuleList(OssDecoderLayer(cfg, cfg.window(i))
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.rope = YarnRotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.context_length,
                                        cfg.rope_scaling)  # no weights: a table
        for name, p in self.named_parameters():  # transformers' init: normal(0, 0.02), biases 0
            if p.dim() > 1:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif "norm" not in name:
                nn.init.zeros_(p)
        for layer in self.layers:  # the sink logits too
            nn.init.normal_(layer.self_attn.sinks, mean=0.0, std=0.02)
        self.arrange_weights()  # the fast layout for decoding (see CausalLM.arrange_weights)
        self.set_kv_cache()  # growing caches on global layers, rings on local ones

    def layer_specs(self) -> list[LayerSpec]:
        c = self.cfg
        return [LayerSpec(c.n_kv_heads, c.head_dim, c.context_length, self.rope.inv_freq,
                          window=c.window(i)) for i in range(c.n_layers)]

    def weight_matrices(self) -> list[nn.Module]:
        """Every linear layer (router and head included) and the token embedding; the experts'
        stacked weights stay as they are."""
        tied = self.cfg.tie_embeddings
        linears = [m for m in self.modules()
                   if isinstance(m, nn.Linear) and not (tied and m is self.lm_head)]
        return [*linears, self.embed_tokens]

    def tie_head(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, idx: Tensor, use_cache: bool = False, last_only: bool = False,
                check_ids: bool = True, logits_at: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, vocab)`` for token ids ``(B, T)``; ``(B, 1, vocab)`` if
        ``last_only``. Positions as in ``LlamaModel.forward``."""
        if check_ids:
            check_token_ids(idx, self.cfg.vocab_size)
        B, T = idx.shape
        start, rows = self.positions(T, use_cache)  # past context_length: one warning
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = self.rope(start, T, like=x) if rows is None else self.rope.at(rows, like=x)
        for layer in self.layers:
            x = layer(x, cos, sin, use_cache)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        elif logits_at is not None:  # (K,): only these tokens' logits (kvlib.Engine)
            x = x[:, logits_at]  # (B, K, C)
        return self.lm_head(self.norm(x))  # (B, T or 1, vocab)
