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

from dataclasses import dataclass, replace

from .models import PRESETS, DeepseekConfig, GPTConfig, LlamaConfig

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
    # Today's layouts (None: every layer caches keys and values of every token):
    latent_dim: int | None = None  # latent attention: numbers cached per token and layer
    window: int | None = None  # local layers keep only their last ``window`` tokens
    global_layers: int | None = None  # with ``window``: the layers that keep every token

    @property
    def values_per_token_layer(self) -> int:
        """Numbers one token adds to one layer's cache: a key and a value per key/value head,
        or one latent (DeepSeek: ``kv_lora_rank + qk_rope_head_dim``, shared by every head)."""
        return self.latent_dim or 2 * self.n_kv_heads * self.head_dim

    def cache_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """Bytes one token adds to the cache of all layers (keys and values, batch 1), while
        every layer still keeps every token (within the window)."""
        return self.n_layers * self.values_per_token_layer * dtype_bytes(dtype)

    def cache_bytes(self, tokens: int, batch: int = 1, dtype: str = "bfloat16") -> int:
        """Bytes of the whole KV cache for ``batch`` sequences of ``tokens`` tokens: local
        layers hold at most ``window`` of them."""
        if self.window is None:
            return self.cache_bytes_per_token(dtype) * tokens * batch
        g = self.n_layers if self.global_layers is None else self.global_layers
        held = g * tokens + (self.n_layers - g) * min(tokens, self.window)
        return held * self.values_per_token_layer * dtype_bytes(dtype) * batch

    def kv_overhead(self, tokens: int, batch: int = 1, dtype: str = "bfloat16") -> float:
        """The cache against the weights, both in ``dtype``: Gemma 3's "KV memory overhead"."""
        return self.cache_bytes(tokens, batch, dtype) / self.weight_bytes(dtype)

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
    """The ModelSpec of a kvlib config: keys and values per head (GPT-2, Llama), a latent
    (DeepSeek), local layers that keep a window (Gemma 3, gpt-oss; parameters not counted: 0)."""
    if isinstance(cfg, DeepseekConfig):  # one latent per token and layer, for every head
        return ModelSpec(name, cfg.n_layers, cfg.n_heads, cfg.n_heads, cfg.qk_head_dim,
                         0, cfg.context_length, latent_dim=cfg.latent_dim)
    if isinstance(cfg, GPTConfig):
        return ModelSpec(name, cfg.n_layers, cfg.n_heads, cfg.n_heads, cfg.head_dim,
                         gpt2_params(cfg), cfg.context_length)
    if not isinstance(cfg, LlamaConfig):  # Gemma 3, gpt-oss: local layers keep a window
        windows = [cfg.window(i) for i in range(cfg.n_layers)]
        return ModelSpec(name, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 0,
                         cfg.context_length, window=cfg.sliding_window,
                         global_layers=windows.count(None))
    return ModelSpec(name, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                     llama_params(cfg), cfg.context_length)


# The table the chapters show: GPT-2's sizes, Llama 3 8B and 70B (8k context; Llama 3.1 has 128k),
# Qwen3 0.6B (embeddings tied) and 8B. get_spec also takes every other preset name.
MODELS: dict[str, ModelSpec] = {
    name: spec_of(name, PRESETS[name])
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-3-8b", "llama-3-70b",
                 "qwen3-0.6b", "qwen3-8b")
}


# Today's layouts, from each model's published config.json (parameter counts as their cards
# round them): what each caches per token, and which layers keep only a window.
ARCHITECTURES: dict[str, ModelSpec] = {
    # latent attention: kv_lora_rank 512 + qk_rope_head_dim 64 per token and layer, for all 128
    # heads (decompressed, each head would hold a 192-wide key and a 128-wide value)
    "deepseek-v3": ModelSpec("deepseek-v3", 61, 128, 128, 192, 671_000_000_000, 163_840,
                             latent_dim=576),
    "deepseek-v2": ModelSpec("deepseek-v2", 60, 128, 128, 192, 236_000_000_000, 131_072,
                             latent_dim=576),
    "deepseek-67b": ModelSpec("deepseek-67b", 95, 64, 8, 128, 67_000_000_000, 4096),  # GQA
    # five local layers (window 1024) to one global: 52 local and 10 global of 62
    "gemma-3-27b": ModelSpec("gemma-3-27b", 62, 32, 16, 128, 27_000_000_000, 131_072,
                             window=1024, global_layers=10),
    # sliding window 128 on every other layer
    "gpt-oss-120b": ModelSpec("gpt-oss-120b", 36, 64, 8, 64, 117_000_000_000, 131_072,
                              window=128, global_layers=18),
    "gpt-oss-20b": ModelSpec("gpt-oss-20b", 24, 64, 8, 64, 21_000_000_000, 131_072,
                             window=128, global_layers=12),
    **{name: MODELS[name] for name in ("llama-3-70b", "qwen3-8b")},
}


CATALOG: dict[str, ModelSpec] = {**MODELS, **ARCHITECTURES}  # every named model, chapter 3's first


def with_layout(spec: ModelSpec, local_per_global: int | None, window: int | None = None
                ) -> ModelSpec:
    """``spec`` with ``local_per_global`` sliding-window layers (of ``window`` tokens) before
    each global one, as Gemma 3 stacks them (5 and 1024); None: every layer global."""
    if local_per_global is None:
        return replace(spec, window=None, global_layers=None)
    if window is None or window < 1 or local_per_global < 0:
        raise ValueError("a local:global layout needs a window of at least 1 token and a "
                         f"number of local layers per global one >= 0, got {window}, "
                         f"{local_per_global}")
    return replace(spec, window=window,
                   global_layers=max(1, spec.n_layers // (local_per_global + 1)))


def mla_reduction(bits: float = 6.0, baseline_bits: float = 16.0) -> float:
    """DeepSeek-V2's "KV cache reduced by 93.3%" against DeepSeek 67B: the paper deploys the
    latent cache quantized to about ``bits`` per number (the baseline in bfloat16). In bfloat16
    both, the same formula gives 82.2%: most of the 93.3% is latent, the rest quantization."""
    v2, dense = ARCHITECTURES["deepseek-v2"], ARCHITECTURES["deepseek-67b"]
    latent = v2.n_layers * v2.values_per_token_layer * bits
    return 1 - latent / (dense.n_layers * dense.values_per_token_layer * baseline_bits)


def get_spec(model: str | ModelSpec | GPTConfig | LlamaConfig) -> ModelSpec:
    """A ModelSpec from a name in ``MODELS`` or ``kvlib.PRESETS``, a ModelSpec, or a config."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (GPTConfig, LlamaConfig)):
        return spec_of("custom", model)
    if model in MODELS or model in ARCHITECTURES:
        return MODELS.get(model) or ARCHITECTURES[model]
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
