"""How many bytes a KV cache takes, for kvlib's GPT-2 sizes and a few well-known open models.

Every layer keeps one key and one value vector per token and per key/value head, so

    cache bytes = 2 x layers x kv_heads x head_dim x tokens x batch x bytes per value

Grouped-query attention (Llama 3, Qwen3) shares each key/value head among several query heads,
which divides the cache by ``n_heads / n_kv_heads`` against plain multi-head attention (GPT-2).
Every number comes from kvlib's presets (``kvlib.PRESETS``), the shapes of each model's published
``config.json`` on the Hugging Face Hub, so the table, the models kvlib builds and the checkpoints
it loads share one source. A model's context is its config's ``context_length``
(``max_position_embeddings``): 1,024 tokens for GPT-2, 8,192 for Llama 3 8B and 70B, and 40,960
for Qwen3-0.6B (and Qwen3-8B) as released; Qwen's longer contexts need YaRN scaling, which kvlib
does not implement.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import PRESETS, GPTConfig, LlamaConfig

DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class ModelSpec:
    """The numbers that set a model's KV-cache size and its weights' size."""

    name: str
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (= n_heads without grouped-query attention)
    head_dim: int
    n_params: int  # every parameter, counted once (tied embeddings once)
    context_length: int  # longest context the model was released for

    def cache_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """Bytes one token adds to the cache of all layers (keys and values, batch 1)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes(dtype)

    def cache_bytes(self, tokens: int, batch: int = 1, dtype: str = "bfloat16") -> int:
        """Bytes of the whole KV cache for ``batch`` sequences of ``tokens`` tokens."""
        return self.cache_bytes_per_token(dtype) * tokens * batch

    def mha_cache_bytes(self, tokens: int, batch: int = 1, dtype: str = "bfloat16") -> int:
        """The same cache if every query head had its own key/value head (no GQA)."""
        per_token = 2 * self.n_layers * self.n_heads * self.head_dim * dtype_bytes(dtype)
        return per_token * tokens * batch

    def weight_bytes(self, dtype: str = "bfloat16") -> int:
        return self.n_params * dtype_bytes(dtype)


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def gpt2_params(cfg: GPTConfig) -> int:
    """Parameters of kvlib's GPT-2 for a config (the output head shares the token embedding)."""
    d, L = cfg.emb_dim, cfg.n_layers
    block = (
        2 * 2 * d  # two LayerNorms (weight and bias)
        + d * 3 * d + (3 * d if cfg.qkv_bias else 0)  # fused q, k, v
        + d * d + d  # attention output projection
        + d * 4 * d + 4 * d + 4 * d * d + d  # MLP
    )
    return cfg.vocab_size * d + cfg.context_length * d + L * block + 2 * d


def llama_params(cfg: LlamaConfig) -> int:
    """Parameters of kvlib's Llama / Qwen3 for a config (RMSNorm, no biases, SwiGLU MLP; Qwen3
    adds a per-head RMSNorm on queries and keys; a tied head counted once)."""
    d, D = cfg.emb_dim, cfg.head_dim
    attn = d * cfg.n_heads * D + 2 * d * cfg.n_kv_heads * D + cfg.n_heads * D * d
    block = attn + 3 * d * cfg.ffn_dim + 2 * d + (2 * D if cfg.qk_norm else 0)
    return cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * block + d


def spec_of(name: str, cfg: GPTConfig | LlamaConfig) -> ModelSpec:
    """The ModelSpec of a kvlib config (either family)."""
    if isinstance(cfg, GPTConfig):
        return ModelSpec(name, cfg.n_layers, cfg.n_heads, cfg.n_heads, cfg.head_dim,
                         gpt2_params(cfg), cfg.context_length)
    if not isinstance(cfg, LlamaConfig):
        raise ValueError(f"{name!r}: kvlib.memory's sizes assume every layer keeps every token, "
                         f"but a {type(cfg).__name__} has local layers that keep a window: build "
                         "the model and read model.kv_cache_nbytes")
    return ModelSpec(name, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                     llama_params(cfg), cfg.context_length)


# The table the chapters show: GPT-2's sizes, Llama 3 8B and 70B (8k context; Llama 3.1 has 128k),
# Qwen3 0.6B (embeddings tied) and 8B. get_spec also takes every other preset name.
MODELS: dict[str, ModelSpec] = {
    name: spec_of(name, PRESETS[name])
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-3-8b", "llama-3-70b",
                 "qwen3-0.6b", "qwen3-8b")
}


def get_spec(model: str | ModelSpec | GPTConfig | LlamaConfig) -> ModelSpec:
    """A ModelSpec from a name in ``MODELS`` or ``kvlib.PRESETS``, a ModelSpec, or a config."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (GPTConfig, LlamaConfig)):
        return spec_of("custom", model)
    if model in MODELS:
        return MODELS[model]
    if model in PRESETS:
        return spec_of(model, PRESETS[model])
    raise ValueError(f"unknown model {model!r}; choose one of {list(MODELS)} (or another kvlib "
                     "preset) or pass a ModelSpec(...) for your own")


def format_bytes(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
