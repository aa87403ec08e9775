"""The Llama 3 / Qwen3 architecture, with a KV cache in every attention layer.

What changes against GPT-2 (``gpt2.py``), one idea at a time:

- **RoPE** instead of learned positions: queries and keys are rotated by an angle that grows with
  their position, so attention scores depend on how far apart two tokens are. Keys are rotated
  *before* they enter the cache, each new token at its own position ``self.pos + t``; a cached key
  never changes again. Nothing ends at ``context_length``: past it the model warns once.
- **Grouped-query attention**: ``n_kv_heads`` key/value heads, each shared by
  ``n_heads / n_kv_heads`` query heads. The cache stores only the ``n_kv_heads`` heads: that is
  the saving (``n_kv_heads = 1`` is multi-query attention, ``= n_heads`` plain multi-head).
- **RMSNorm** (no mean, no bias), a **SwiGLU** MLP, no biases anywhere, an output head that is
  tied to the token embedding or not (``tie_embeddings``).
- **Qwen3** adds ``qk_norm``; **gpt-oss** ``attn_sinks``, a learned logit per query head in the
  softmax (``SinkAttention``), so a head may attend to nothing at all.

Module names are Hugging Face's, so a checkpoint maps 1:1 (``kvlib.hf.llama``); the rotation
follows transformers' ``rotate_half`` convention."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..caches import LayerSpec
from ..rotary import apply_rope, rotate_half  # noqa: F401  (rotate_half: chapter 7 shows it here)
from .base import CachedAttention, CausalLM, attend, attend_with, attention_weights, check_token_ids


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1/3.2's RoPE frequency scaling (transformers' ``rope_type: "llama3"``): slow
    rotations (wavelength above ``original_context_length / low_freq_factor``) turn ``factor``
    times slower, fast ones (below ``original_context_length / high_freq_factor``) stay, and the
    ones in between are blended."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192  # HF: original_max_position_embeddings

    def __post_init__(self) -> None:
        if not (self.factor > 0 and 0 < self.low_freq_factor < self.high_freq_factor
                and self.original_context_length > 0):
            raise ValueError(f"invalid Llama 3 rope scaling {self}: need factor > 0, "
                             "0 < low_freq_factor < high_freq_factor, original_context_length > 0")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 128256  # Llama 3's tiktoken-based vocabulary
    context_length: int = 8192  # the length it was trained for (RoPE: not a hard limit)
    emb_dim: int = 4096  # HF: hidden_size
    n_heads: int = 32  # query heads
    n_kv_heads: int = 8  # key/value heads; must divide n_heads
    n_layers: int = 32
    ffn_dim: int = 14336  # HF: intermediate_size
    head_dim: int = 128  # explicit: Qwen3 has head_dim * n_heads != emb_dim
    rope_theta: float = 500000.0
    rope_scaling: Llama3RopeScaling | None = None  # a dict with the same keys is accepted
    rms_norm_eps: float = 1e-5
    qk_norm: bool = False  # Qwen3: RMSNorm over each query and key head
    tie_embeddings: bool = False  # lm_head shares embed_tokens' weight
    attn_sinks: bool = False  # gpt-oss: a learned sink logit per query head (SinkAttention)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            names = {f.name for f in fields(Llama3RopeScaling)}
            if not set(self.rope_scaling) <= names:
                raise ValueError(f"rope_scaling keys must be among {sorted(names)}, "
                                 f"got {sorted(self.rope_scaling)}")
            object.__setattr__(self, "rope_scaling", Llama3RopeScaling(**self.rope_scaling))
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_kv_heads",
                     "n_layers", "ffn_dim", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}): every "
                "key/value head serves the same number of query heads (e.g. 32 and 8)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of "
                             "dimensions")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps "
                             f"({self.rms_norm_eps}) must be positive")

    @property
    def n_groups(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> LlamaConfig:
        """A named configuration (``from_preset("qwen3-0.6b")``); keywords override its fields."""
        if name not in LLAMA_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(LLAMA_PRESETS)}")
        return replace(LLAMA_PRESETS[name], **overrides)


_QWEN3 = dict(vocab_size=151936, context_length=40960, head_dim=128, n_kv_heads=8,
              rope_theta=1000000.0, rms_norm_eps=1e-6, qk_norm=True)
_TINY = dict(vocab_size=50257, context_length=256, emb_dim=64, n_layers=2, ffn_dim=192,
             head_dim=16, rope_theta=10000.0)

# The released shapes, from each model's config.json on the Hugging Face Hub.
LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama-3.2-1b": LlamaConfig(  # meta-llama/Llama-3.2-1B, 1.24B parameters
        context_length=131072, emb_dim=2048, n_heads=32, n_kv_heads=8, n_layers=16, ffn_dim=8192,
        head_dim=64, rope_scaling=Llama3RopeScaling(32.0, 1.0, 4.0, 8192), tie_embeddings=True),
    "llama-3-8b": LlamaConfig(),  # meta-llama/Meta-Llama-3-8B, 8.03B
    "llama-3-70b": LlamaConfig(  # meta-llama/Meta-Llama-3-70B, 70.6B
        emb_dim=8192, n_heads=64, n_kv_heads=8, n_layers=80, ffn_dim=28672),
    "qwen3-0.6b": LlamaConfig(  # Qwen/Qwen3-0.6B, 0.60B
        **_QWEN3, emb_dim=1024, n_heads=16, n_layers=28, ffn_dim=3072, tie_embeddings=True),
    "qwen3-8b": LlamaConfig(  # Qwen/Qwen3-8B, 8.19B
        **_QWEN3, emb_dim=4096, n_heads=32, n_layers=36, ffn_dim=12288),
    # Small enough for tests and chapters; GPT-2's vocabulary, so kvlib's tokenizer works.
    "tiny-llama": LlamaConfig(**_TINY, n_heads=4, n_kv_heads=2),  # GQA: 2 query heads per kv
    "tiny-llama-mha": LlamaConfig(**_TINY, n_heads=4, n_kv_heads=4),  # multi-head
    "tiny-llama-mqa": LlamaConfig(**_TINY, n_heads=4, n_kv_heads=1),  # multi-query
    "tiny-qwen3": LlamaConfig(  # head_dim 32 != 64 / 4, as in Qwen3
        **{**_TINY, "head_dim": 32, "rope_theta": 1000000.0}, n_heads=4, n_kv_heads=2,
        rms_norm_eps=1e-6, qk_norm=True, tie_embeddings=True),
    # Trained here like mini-gpt2 (same data, vocabulary, width and depth): 6 query heads share
    # 2 key/value heads, and the SwiGLU MLP has as many weights as mini-gpt2's 4x GELU MLP.
    "mini-llama": LlamaConfig(vocab_size=8192, context_length=512, emb_dim=192, n_heads=6,
                              n_kv_heads=2, n_layers=6, ffn_dim=512, head_dim=32,
                              rope_theta=10000.0, tie_embeddings=True),
    # A draft for speculative decoding (chapter 12): mini-llama's vocabulary and data, 2 layers
    # of width 128, so a step costs a fraction of mini-llama's.
    "mini-llama-draft": LlamaConfig(vocab_size=8192, context_length=512, emb_dim=128,
                                    n_heads=4, n_kv_heads=2, n_layers=2, ffn_dim=352,
                                    head_dim=32, rope_theta=10000.0, tie_embeddings=True),
}


def rope_frequencies(head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
                     ) -> Tensor:
    """The ``head_dim / 2`` rotation speeds (radians per position), float32, as transformers
    computes them: ``theta ** (-2i / head_dim)``, then Llama 3's scaling if given."""
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if (s := scaling) is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_context_length / s.low_freq_factor  # longer: slowed down
    high_freq_wavelen = s.original_context_length / s.high_freq_factor  # shorter: unchanged
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_context_length / wavelen - s.low_freq_factor) / (s.high_freq_factor
                                                                           - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(between, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin ``(context_length, head_dim)`` of the trained positions (float32 math, the model's
    dtype; a cast or moved table is recomputed). Past them only the last call's pages of
    ``context_length`` positions are kept, so a stream with sinks holds bounded memory."""

    def __init__(self, head_dim: int, theta: float, context_length: int,
                 scaling: Llama3RopeScaling | None = None) -> None:
        super().__init__()  # head_dim rotated channels (DeepSeek: only qk_rope_head_dim)
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("cos", None, persistent=False)  # (positions, D)
        self.register_buffer("sin", None, persistent=False)
        self.build(context_length)

    def build(self, positions: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> None:
        """The table of ``positions`` positions (loading rebuilds a meta model's)."""
        self.cos, self.sin = self.angles(0, positions, device, dtype)
        self._exact = self.cos  # a .to() that casts or moves the buffer replaces this tensor
        self._pages: tuple[tuple, Tensor, Tensor] | None = None  # (key, cos, sin) past the table

    def angles(self, lo: int, hi: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor even in generate
            inv_freq = self.inv_freq if device is None else self.inv_freq.to(device)
            pos = torch.arange(lo, hi, device=inv_freq.device).float()
            freqs = pos[:, None] * inv_freq[None, :]  # (positions, D/2)
            angles = torch.cat([freqs, freqs], dim=-1)  # (positions, D): rotate_half's layout
            return angles.cos().to(dtype), angles.sin().to(dtype)

    @property
    def inv_freq(self) -> Tensor:
        """The ``(D/2,)`` frequencies (float32, CPU): what the sink cache moves keys with."""
        return rope_frequencies(self.head_dim, self.theta, self.scaling)

    def _table(self, like: Tensor) -> int:  # its length, recomputed if it was cast or moved
        if self.cos is not self._exact or self.cos.dtype != like.dtype \
                or self.cos.device != like.device:
            self.build(self.cos.shape[0], like.device, like.dtype)
        return self.cos.shape[0]

    def _past(self, lo: int, hi: int, like: Tensor) -> tuple[int, Tensor, Tensor]:
        """(first position, cos, sin) of the whole pages of positions ``lo .. hi - 1``."""
        n = self.cos.shape[0]  # a page: as many positions as the table
        first, last = lo // n * n, ((hi - 1) // n + 1) * n
        key = (first, last, like.dtype, like.device)
        if self._pages is None or self._pages[0] != key:
            self._pages = (key, *self.angles(first, last, like.device, like.dtype))
        return first, self._pages[1], self._pages[2]

    def forward(self, start: int, T: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin ``(T, D)`` of positions ``start .. start + T - 1``, in ``like``'s dtype.
        Compiled, past the table, just those positions' (a page would be a guard per page)."""
        if (end := start + T) <= self._table(like):
            return self.cos[start:end], self.sin[start:end]
        if torch.compiler.is_compiling():  # one graph serves every position
            return self.angles(start, end, like.device, like.dtype)
        first, cos, sin = self._past(start, end, like)
        return cos[start - first : end - first], sin[start - first : end - first]

    def at(self, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin ``(B, 1, T, D)`` of per-row positions ``(B, T)``."""
        if (top := int(positions.max()) + 1) <= self._table(like):
            return self.cos[positions][:, None], self.sin[positions][:, None]
        first, cos, sin = self._past(int(positions.min()), top, like)
        return cos[positions - first][:, None], sin[positions - first][:, None]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 as in transformers."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class GroupedQueryAttention(CachedAttention):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.emb_dim, q_dim, bias=False)
        self.k_proj = nn.Linear(cfg.emb_dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.emb_dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, cfg.emb_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries ``(B, H, T, D)``, keys and values ``(B, H_kv, T, D)`` of ``x`` ``(B, T, C)``,
        queries and keys rotated by their positions' ``cos``/``sin``."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: normalise every head's query and key
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or H_kv, T, D)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v  # keys rotated before caching

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, use_cache: bool = False) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        y = attend(q, k, v, self.kv_cache if use_cache else None)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attention_weights(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The causal softmax weights ``(B, H, T, T)`` of ``x`` over itself (for pictures: the
        fast path never forms them)."""
        q, k, _ = self.project(x, cos, sin)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, T, D)
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5  # (B, H, T, T)
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class SinkAttention(GroupedQueryAttention):
    """Grouped-query attention with gpt-oss's learned sinks: head h's scores get one more
    column, the logit ``sinks[h]``, before the softmax, and lose it after, so the weights of
    the real keys sum to less than one ("softmax plus one" when the logit is 0, its start).
    A head that has nothing to look at need not park its attention on the first token, as the
    attention sinks of StreamingLLM do (chapter 8). The fused kernel takes no such column, so
    the attention is written out (``kvlib.models.base.written_attention``)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__(cfg)
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads))  # (H,) transformers' name and shape
        self.window: int | None = None  # every Llama layer is global (gpt-oss's local: a window)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, use_cache: bool = False) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        y = attend_with(q, k, v, self.kv_cache if use_cache else None, window=self.window,
                        sinks=self.sinks)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attention_weights(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The causal weights ``(B, H, T, T)`` of the real keys (each row sums to less than one:
        the rest went to the sink)."""
        q, k, _ = self.project(x, cos, sin)
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return attention_weights(q, k, causal, sinks=self.sinks)


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.emb_dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.emb_dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.emb_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.self_attn = (SinkAttention if cfg.attn_sinks else GroupedQueryAttention)(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, use_cache: bool = False) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, use_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(CausalLM):
    hard_context = False  # RoPE: positions go on past context_length (with a warning)

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        # no weights: a table computed from the config
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.context_length,
                                    cfg.rope_scaling)
        for module in self.modules():  # transformers' init: normal(0, 0.02), RMSNorm weights 1
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        self.arrange_weights()  # the fast layout for decoding (see CausalLM.arrange_weights)
        self.set_kv_cache()  # a growing cache in every layer until one is chosen

    def layer_specs(self) -> list[LayerSpec]:
        """Every layer caches its ``n_kv_heads`` heads, rotated by the model's RoPE."""
        c = self.cfg
        return [LayerSpec(c.n_kv_heads, c.head_dim, c.context_length,
                          self.rope.inv_freq)] * c.n_layers

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
        """Logits ``(B, T, vocab)`` for token ids ``(B, T)``; ``(B, 1, vocab)`` if ``last_only``.

        With ``use_cache`` the tokens continue the cached ones at positions ``self.pos``,
        ``self.pos + 1``, ...; without, they sit at positions 0 .. T-1. ``check_ids=False`` skips
        the range check, for a loop that feeds back tokens the model itself produced.
        ``logits_at`` ``(K,)``: the logits of those tokens only, ``(B, K, vocab)``.
        """
        if check_ids:
            check_token_ids(idx, self.cfg.vocab_size)
        B, T = idx.shape
        start, rows = self.positions(T, use_cache)  # past context_length: one warning
        x = self.embed_tokens(idx)  # (B, T, C)
        if rows is None:
            cos, sin = self.rope(start, T, like=x)  # (T, D) each
        else:
            cos, sin = self.rope.at(rows, like=x)  # (B, 1, T, D): each row at its positions
        for layer in self.layers:
            x = layer(x, cos, sin, use_cache)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        elif logits_at is not None:  # (K,): only these tokens' logits (kvlib.Engine)
            x = x[:, logits_at]  # (B, K, C)
        return self.lm_head(self.norm(x))  # (B, T or 1, vocab)
