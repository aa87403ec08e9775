"""The model families kvlib runs, and one table of named presets across them.

| family | file | positions | attention |
|---|---|---|---|
| GPT-2 | ``gpt2.py`` | learned, a hard limit | multi-head, fused QKV with bias |
| Llama 3 / Qwen3 | ``llama.py`` | RoPE | grouped-query, optional QK-norm |
| DeepSeek-V3, dense | ``deepseek.py`` | RoPE, part of a head | latent (MLA): caches a latent |
"""

from __future__ import annotations

from .base import CachedAttention, CausalLM, attend, check_token_ids
from .deepseek import DEEPSEEK_PRESETS, DeepseekConfig, DeepseekModel
from .gpt2 import GPT2_PRESETS, GPTConfig, GPTModel
from .llama import LLAMA_PRESETS, Llama3RopeScaling, LlamaConfig, LlamaModel

ModelConfig = GPTConfig | LlamaConfig | DeepseekConfig  # one config per family
PRESETS: dict[str, ModelConfig] = {**GPT2_PRESETS, **LLAMA_PRESETS, **DEEPSEEK_PRESETS}


def build_model(cfg: ModelConfig) -> CausalLM:
    """A randomly initialised model of the family that ``cfg`` describes."""
    if isinstance(cfg, GPTConfig):
        return GPTModel(cfg)
    if isinstance(cfg, LlamaConfig):
        return LlamaModel(cfg)
    if isinstance(cfg, DeepseekConfig):
        return DeepseekModel(cfg)
    raise TypeError(f"no kvlib model family takes a {type(cfg).__name__}; "
                    "pass a GPTConfig, a LlamaConfig or a DeepseekConfig")


__all__ = ["DEEPSEEK_PRESETS", "GPT2_PRESETS", "LLAMA_PRESETS", "PRESETS", "CachedAttention",
           "CausalLM", "DeepseekConfig", "DeepseekModel", "GPTConfig", "GPTModel",
           "Llama3RopeScaling", "LlamaConfig", "LlamaModel", "ModelConfig", "attend",
           "build_model", "check_token_ids"]
