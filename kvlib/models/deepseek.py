"""DeepSeek-V3's multi-head latent attention (MLA), with a cache that holds only the latent.

What changes against Llama (``llama.py``), one idea at a time:

- **Keys and values come out of one small latent.** ``kv_a_proj_with_mqa`` turns each token into
  ``kv_lora_rank`` numbers ``c_kv`` (normalised by ``kv_a_layernorm``) and one RoPE key of
  ``qk_rope_head_dim`` numbers that every head shares. ``kv_b_proj`` decompresses ``c_kv`` into
  each head's key (``qk_nope_head_dim`` numbers that carry no position) and value
  (``v_head_dim``); a head's full key is its decompressed key beside the shared RoPE key.
- **The cache holds the latent, not keys and values**: ``kv_lora_rank + qk_rope_head_dim``
  numbers per token and layer, whatever the number of heads (Llama: ``2 x n_kv_heads x
  head_dim``). kvlib's caches store keys and values of one shape, so the latent is stored as one
  "head" cut in two equal halves, the first as the cache's keys, the second as its values
  (``LayerSpec(1, latent_dim / 2, ..., latent=True)``): every strategy stores it unchanged, and
  ``kv_cache_nbytes`` is exactly layers x tokens x latent_dim x bytes per number. Strategies that
  would move cached keys ("sinks") refuse a latent (``kvlib.caches.registry.check_layers``).
- **Two ways to attend, the same numbers** (``model.attn_impl``, DeepSeek-V3's
  ``inference/model.py``): "naive" decompresses every cached latent through ``kv_b_proj`` at
  every step and runs ordinary multi-head attention, as transformers does; "absorb" folds
  ``kv_b_proj``'s key half into the query (``score = (q_nope W_UK) . c_kv + q_rope . k_rope``),
  attends over the latent itself (one key/value head shared by every query head: multi-query
  attention over ``latent_dim`` numbers), and applies the value half ``W_UV`` after the weighted
  sum, before ``o_proj``. Nothing per head is ever formed for the cached tokens.
- **Low-rank queries**: ``q_a_proj`` (to ``q_lora_rank``), ``q_a_layernorm``, ``q_b_proj``; or one
  ``q_proj`` when ``q_lora_rank`` is None.
- RoPE turns only the ``qk_rope_head_dim`` channels, DeepSeek's neighbouring pairs (transformers'
  ``rope_interleave``), and the softmax scale is ``1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)``.
- Every MLP is a dense SwiGLU, as in DeepSeek-V3's first ``first_k_dense_replace`` layers: its
  mixture of experts is not implemented (``kvlib.hf.deepseek`` refuses such checkpoints).

Module names are transformers' ``DeepseekV3ForCausalLM``'s, so a checkpoint maps 1:1 once its
``model.`` prefix is dropped (``kvlib.hf.deepseek``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..caches import KVCache, LayerSpec
from ..rotary import apply_rope
from .base import CachedAttention, CausalLM, attend, check_token_ids
from .llama import RMSNorm, RotaryEmbedding, SwiGLU

ATTN_IMPLS = ("naive", "absorb")
LORA_NORM_EPS = 1e-6  # q_a_layernorm's and kv_a_layernorm's, fixed (transformers, DeepSeek)


@dataclass(frozen=True)
class DeepseekConfig:
    """The defaults are DeepSeek-V3's attention and dense-MLP shapes (its config.json); its
    mixture-of-experts layers are not implemented, so no preset is the released model."""

    vocab_size: int = 129280
    context_length: int = 4096  # HF: max_position_embeddings
    emb_dim: int = 7168  # HF: hidden_size
    n_heads: int = 128  # query heads; each gets its own key and value out of the latent
    n_layers: int = 61
    ffn_dim: int = 18432  # HF: intermediate_size (the dense layers')
    q_lora_rank: int | None = 1536  # None: one q_proj, no low-rank queries
    kv_lora_rank: int = 512  # the latent c_kv, cached
    qk_nope_head_dim: int = 128  # each head's key/query channels that carry no position
    qk_rope_head_dim: int = 64  # the rotated channels; the key's are shared and cached
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # RoPE pairs neighbouring channels (x0, x1), (x2, x3), ...
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "ffn_dim",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int)
                                             or self.q_lora_rank <= 0):
            raise ValueError(f"q_lora_rank must be a positive integer or None (a plain q_proj), "
                             f"got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: RoPE "
                             "rotates pairs of channels")
        if self.kv_lora_rank % 2:
            raise ValueError(f"kv_lora_rank ({self.kv_lora_rank}) must be even: the cache stores "
                             "the latent (kv_lora_rank + qk_rope_head_dim numbers) as two halves")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps "
                             f"({self.rms_norm_eps}) must be positive")

    @property
    def qk_head_dim(self) -> int:
        """A head's query and key size: the channels without position, then the rotated ones."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Numbers cached per token and layer: the latent ``c_kv`` and the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DeepseekConfig:
        """A named configuration (``from_preset("tiny-deepseek")``); keywords override fields."""
        if name not in DEEPSEEK_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(DEEPSEEK_PRESETS)}")
        return replace(DEEPSEEK_PRESETS[name], **overrides)


DEEPSEEK_PRESETS: dict[str, DeepseekConfig] = {
    # Small enough for tests; GPT-2's vocabulary, so kvlib's tokenizer works. 40 numbers cached
    # per token and layer, against 2 x 4 x 16 = 128 for tiny-llama-mha's four heads.
    "tiny-deepseek": DeepseekConfig(
        vocab_size=50257, context_length=256, emb_dim=64, n_heads=4, n_layers=2, ffn_dim=192,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16),
}


class LatentCacheView:
    """A latent attention layer's cache as ``attend`` sees it: ``update`` stores the new tokens'
    latent (its two halves as the cache's keys and values) and returns what ``expand`` makes of
    every latent held; the rest (traits, window, masks, ``observe``) is the cache's own."""

    def __init__(self, cache: KVCache, expand: Callable[[Tensor], tuple[Tensor, Tensor]]
                 ) -> None:
        self.cache, self.expand = cache, expand

    def update(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        first, second = self.cache.update(first, second)  # (B, 1, S, latent_dim / 2) each
        return self.expand(torch.cat([first, second], dim=-1))  # from (B, 1, S, latent_dim)

    def attend_in_place(self, q: Tensor, first: Tensor, second: Tensor) -> None:
        return None  # what attention reads is the expansion, never the stored halves

    def __getattr__(self, name: str):
        return getattr(self.cache, name)


class LatentAttention(CachedAttention):
    """Multi-head latent attention; ``attn_impl`` ("naive" or "absorb") says how it attends."""

    def __init__(self, cfg: DeepseekConfig) -> None:
        super().__init__()
        H, C, qk = cfg.n_heads, cfg.emb_dim, cfg.qk_head_dim
        self.n_heads, self.rank, self.interleave = H, cfg.kv_lora_rank, cfg.rope_interleave
        self.nope_dim, self.rope_dim, self.v_dim = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                    cfg.v_head_dim)
        self.scale = qk**-0.5  # the softmax scale of a head's full query and key
        self.attn_impl = "naive"  # set through the model: model.attn_impl = "absorb"
        self.q_proj = nn.Linear(C, H * qk, bias=False) if cfg.q_lora_rank is None else None
        self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if cfg.q_lora_rank is not None:  # low rank: C -> q_lora_rank, normalised, -> every head
            self.q_a_proj = nn.Linear(C, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, cfg.latent_dim, bias=False)  # c_kv, k_rope
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope_dim + self.v_dim),
                                   bias=False)  # W_UK and W_UV, head by head
        self.o_proj = nn.Linear(H * self.v_dim, C, bias=False)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """RoPE on ``(..., P)``. DeepSeek pairs neighbouring channels; they are laid out as
        ``rotate_half`` pairs them (channel i with i + P/2) first, which turns each pair by the
        same angle: transformers' ``apply_rotary_pos_emb_interleave``, bit for bit."""
        if self.interleave:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        return apply_rope(x, cos, sin)

    def queries(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Each head's query channels without position ``(B, H, T, Dn)`` and rotated
        ``(B, H, T, P)``, for ``x`` ``(B, T, C)``."""
        B, T, _ = x.shape
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # (B, T, H * (Dn + P))
        q = q.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, Dn + P)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, self.rotate(q_rope, cos, sin)

    def latent(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """What each token leaves in the cache: ``(B, 1, T, R + P)``, its normalised latent
        ``c_kv`` and its RoPE key (shared by every head), rotated at its position."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        k_rope = self.rotate(k_rope[:, None], cos, sin)  # (B, 1, T, P)
        return torch.cat([self.kv_a_layernorm(c_kv)[:, None], k_rope], dim=-1)

    def decompress(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """"naive": latents ``(B, 1, S, R + P)`` through ``kv_b_proj``, each head's keys
        ``(B, H, S, Dn + P)`` (the shared RoPE key appended) and values ``(B, H, S, Dv)``."""
        B, _, S, _ = latent.shape
        c_kv, k_rope = latent.split([self.rank, self.rope_dim], dim=-1)  # (B, 1, S, R or P)
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, -1).transpose(1, 2)  # (B, H, S, .)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = k_rope.expand(B, self.n_heads, S, self.rope_dim)  # a view: no copy
        return torch.cat([k_nope, k_rope], dim=-1), v

    def weights_uk_uv(self) -> tuple[Tensor, Tensor]:
        """``kv_b_proj``'s two halves, head by head: ``W_UK`` ``(H, Dn, R)`` and ``W_UV``
        ``(H, Dv, R)`` (views of its weight)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def absorbed_queries(self, q_nope: Tensor, q_rope: Tensor) -> Tensor:
        """"absorb": queries that score the latent itself, ``(B, H, T, R + P)``: ``q_nope W_UK``
        beside ``q_rope``. ``attend`` scales scores by ``1 / sqrt(R + P)``, the size of what it
        reads; the queries carry the rest of ``1 / sqrt(Dn + P)``."""
        w_uk, _ = self.weights_uk_uv()
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, R)
        rescale = self.scale * (self.rank + self.rope_dim) ** 0.5
        return torch.cat([q_latent, q_rope], dim=-1) * rescale

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, use_cache: bool = False) -> Tensor:
        B, T, _ = x.shape
        q_nope, q_rope = self.queries(x, cos, sin)
        latent = self.latent(x, cos, sin)  # (B, 1, T, R + P)
        absorb = self.attn_impl == "absorb"
        if absorb:  # the latent is the one key and value head: (B, 1, S, R + P) both
            q, expand = self.absorbed_queries(q_nope, q_rope), lambda c: (c, c)
        else:
            q, expand = torch.cat([q_nope, q_rope], dim=-1), self.decompress
        cache = self.kv_cache if use_cache else None
        if cache is None:
            y = attend(q, *expand(latent), None)
        else:  # the cache stores the latent's halves; attention reads their expansion
            y = attend(q, *latent.chunk(2, dim=-1), LatentCacheView(cache, expand))
        if absorb:  # (B, H, T, R + P): the weighted latents; W_UV makes each head's value
            _, w_uv = self.weights_uk_uv()
            y = torch.einsum("bhtr,hvr->bhtv", y[..., : self.rank], w_uv)  # (B, H, T, Dv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def attention_weights(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The causal softmax weights ``(B, H, T, T)`` of ``x`` over itself (for pictures: the
        fast path never forms them)."""
        q_nope, q_rope = self.queries(x, cos, sin)
        k, _ = self.decompress(self.latent(x, cos, sin))  # (B, H, T, Dn + P)
        scores = torch.cat([q_nope, q_rope], dim=-1) @ k.transpose(-1, -2) * self.scale
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.self_attn = LatentAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)  # Llama's: gate_proj, up_proj, down_proj (emb_dim, ffn_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, use_cache: bool = False) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, use_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(CausalLM):
    hard_context = False  # RoPE: positions go on past context_length (with a warning)

    def __init__(self, cfg: DeepseekConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.context_length)
        for module in self.modules():  # transformers' init: normal(0, 0.02), RMSNorm weights 1
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        self.arrange_weights()  # the fast layout for decoding (see CausalLM.arrange_weights)
        self.set_kv_cache()  # a growing cache in every layer until one is chosen

    @property
    def attn_impl(self) -> str:
        """How every layer attends: "naive" (decompress every cached latent, the default: what
        transformers computes) or "absorb" (attend over the latent itself)."""
        return self.layers[0].self_attn.attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        for layer in self.layers:
            layer.self_attn.attn_impl = impl

    def layer_specs(self) -> list[LayerSpec]:
        """Every layer caches one latent per token, ``latent_dim`` numbers stored as the keys
        and values of one "head" of ``latent_dim / 2`` each; ``latent=True``: no strategy may
        move them as RoPE keys."""
        c = self.cfg
        return [LayerSpec(1, c.latent_dim // 2, c.context_length, latent=True)] * c.n_layers

    def weight_matrices(self) -> list[nn.Module]:
        """Every linear layer and the token embedding, less the head when it is tied to it."""
        tied = self.cfg.tie_embeddings
        linears = [m for m in self.modules()
                   if isinstance(m, nn.Linear) and not (tied and m is self.lm_head)]
        return [*linears, self.embed_tokens]

    def tie_head(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, idx: Tensor, use_cache: bool = False, last_only: bool = False,
                check_ids: bool = True, logits_at: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, vocab)`` for token ids ``(B, T)``; ``(B, 1, vocab)`` if ``last_only``
        (as ``LlamaModel.forward``: with ``use_cache`` the tokens continue the cached ones)."""
        if check_ids:
            check_token_ids(idx, self.cfg.vocab_size)
        B, T = idx.shape
        start, rows = self.positions(T, use_cache)  # past context_length: one warning
        x = self.embed_tokens(idx)  # (B, T, C)
        if rows is None:
            cos, sin = self.rope(start, T, like=x)  # (T, P) each
        else:
            cos, sin = self.rope.at(rows, like=x)  # (B, 1, T, P): each row at its positions
        for layer in self.layers:
            x = layer(x, cos, sin, use_cache)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        elif logits_at is not None:  # (K,): only these tokens' logits (kvlib.Engine)
            x = x[:, logits_at]  # (B, K, C)
        return self.lm_head(self.norm(x))  # (B, T or 1, vocab)
