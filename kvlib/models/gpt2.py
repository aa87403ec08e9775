"""The GPT-2 architecture, with a KV cache in every attention layer.

Exactly GPT-2: learned position embeddings, pre-LayerNorm blocks (eps 1e-5), a fused QKV projection
with bias, GELU with the tanh approximation, and an output head tied to the token embedding, so the
released GPT-2 weights load without changes (see ``kvlib.hf.gpt2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch.nn.functional as F
from torch import Tensor, nn

from ..caches import LayerSpec
from .base import CachedAttention, CausalLM, attend, check_token_ids


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    context_length: int = 1024  # learned position embeddings: a hard limit
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    dropout: float = 0.0  # GPT-2 trained with 0.1; inference does not use it
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A named configuration (``from_preset("gpt2")``); keywords override its fields."""
        if name not in GPT2_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(GPT2_PRESETS)}")
        return replace(GPT2_PRESETS[name], **overrides)


GPT2_PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(),  # 124M
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),  # 1558M
    # Small enough for tests and quick experiments; same tokenizer as GPT-2.
    "tiny": GPTConfig(context_length=256, emb_dim=64, n_heads=4, n_layers=2),
    # Trained here on the Python standard library (python -m kvlib.train), with GPT-2's BPE cut
    # to 8192 ids (kvlib.vocab); kvlib.load_model("mini-gpt2") loads the shipped weights.
    "mini-gpt2": GPTConfig(vocab_size=8192, context_length=512, emb_dim=192, n_heads=6,
                           n_layers=6),
}


class CausalSelfAttention(CachedAttention):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, use_cache: bool = False) -> Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)

        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, self.kv_cache if use_cache else None, dropout)  # (B, H, T, D)
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


class GPTModel(CausalLM):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)  # token embeddings
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)  # learned positions
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        self.arrange_weights()  # the fast layout for decoding (see CausalLM.arrange_weights)
        self.set_kv_cache()  # a growing cache in every layer until one is chosen

    def layer_specs(self) -> list[LayerSpec]:
        """Every layer caches all its heads; positions are learned, so no RoPE frequencies."""
        c = self.cfg
        return [LayerSpec(c.n_heads, c.head_dim, c.context_length)] * c.n_layers

    def weight_matrices(self) -> list[nn.Module]:
        """Every linear layer and the token embedding, which is also the output head (tied)."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear) and m is not self.lm_head]
        return [*linears, self.wte]

    def tie_head(self) -> None:
        self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, use_cache: bool = False, last_only: bool = False,
                check_ids: bool = True, logits_at: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, vocab)`` for token ids ``(B, T)``; ``(B, 1, vocab)`` if ``last_only``.

        With ``use_cache`` the tokens continue the cached ones: the first call fills the caches,
        later calls append, and positions start at the caches' length (``self.pos``).
        ``check_ids=False`` skips the range check, for a loop that feeds back tokens the model
        itself produced. ``logits_at`` ``(K,)``: the logits of those tokens only, ``(B, K,
        vocab)`` (a packed batch wants each request's last).
        """
        if check_ids:
            check_token_ids(idx, self.cfg.vocab_size)
        B, T = idx.shape
        start, rows = self.positions(T, use_cache)  # rows: (B, T) when rows differ, else None
        if rows is None:
            pos_emb = self.wpe.weight[start : start + T]  # (T, C): the positions are consecutive
        else:
            pos_emb = self.wpe(rows)  # (B, T, C): each row at its own positions
        x = self.wte(idx) + pos_emb  # (B, T, C)
        if self.training:
            x = F.dropout(x, self.cfg.dropout)
        for block in self.h:
            x = block(x, use_cache)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C): generation needs only the next token's logits
        elif logits_at is not None:  # (K,): only these tokens' logits (kvlib.Engine)
            x = x[:, logits_at]  # (B, K, C)
        return self.lm_head(self.ln_f(x))  # (B, T or 1, vocab)

