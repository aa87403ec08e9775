"""The model families kvlib runs, and one table of named presets across them.

| family | file | positions | attention |
|---|---|---|---|
| GPT-2 | ``gpt2.py`` | learned, a hard limit | multi-head, fused QKV with bias |
| Llama 3 / Qwen3 | ``llama.py`` | RoPE | grouped-query, optional QK-norm, learned sinks |
| DeepSeek-V3, dense | ``deepseek.py`` | RoPE, part of a head | latent (MLA): caches a latent |
| Gemma 3 | ``gemma.py`` | RoPE, a base per layer type | grouped-query, 5 local : 1 global |
| gpt-oss | ``gpt_oss.py`` | RoPE (YaRN) | grouped-query, learned sinks, local and global |
"""

from __future__ import annotations

from .base import CachedAttention, CausalLM, attend, attend_with, check_token_ids
from .deepseek import DEEPSEEK_PRESETS, DeepseekConfig, DeepseekModel
from .gemma import GEMMA_PRESETS, GemmaConfig, GemmaModel
from .gpt2 import GPT2_PRESETS, GPTConfig, GPTModel
from .gpt_oss import GPT_OSS_PRESETS, GptOssConfig, GptOssModel
from .llama import LLAMA_PRESETS, Llama3RopeScaling, LlamaConfig, LlamaModel

ModelConfig = GPTConfig | LlamaConfig | DeepseekConfig | GemmaConfig | GptOssConfig  # a family each
PRESETS: dict[str, ModelConfig] = {**GPT2_PRESETS, **LLAMA_PRESETS, **DEEPSEEK_PRESETS,
                                   **GEMMA_PRESETS, **GPT_OSS_PRESETS}


def build_model(cfg: ModelConfig) -> CausalLM:
    """A randomly initialised model of the family that ``cfg`` describes."""
    if isinstance(cfg, GPTConfig):
        return GPTModel(cfg)
    if isinstance(cfg, LlamaConfig):
        return LlamaModel(cfg)
    if isinstance(cfg, DeepseekConfig):
        return DeepseekModel(cfg)
    if isinstance(cfg, GemmaConfig):
        return GemmaModel(cfg)
    if isinstance(cfg, GptOssConfig):
        return GptOssModel(cfg)
    raise TypeError(f"no kvlib model family takes a {type(cfg).__name__}; pass a GPTConfig, a "
                    "LlamaConfig, a DeepseekConfig, a GemmaConfig or a GptOssConfig")


__all__ = ["DEEPSEEK_PRESETS", "GEMMA_PRESETS", "GPT2_PRESETS", "GPT_OSS_PRESETS",
           "LLAMA_PRESETS", "PRESETS", "CachedAttention", "CausalLM", "DeepseekConfig",
           "DeepseekModel", "GPTConfig", "GPTModel", "GemmaConfig", "GemmaModel", "GptOssConfig",
           "GptOssModel", "Llama3RopeScaling", "LlamaConfig", "LlamaModel", "ModelConfig",
           "attend", "attend_with", "build_model", "check_token_ids"]
