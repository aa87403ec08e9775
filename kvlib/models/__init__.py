"""The model families kvlib runs, and one table of named presets across them.

| family | file | positions | attention |
|---|---|---|---|
| GPT-2 | ``gpt2.py`` | learned, a hard limit | multi-head, fused QKV with bias |
| Llama 3 / Qwen3 | ``llama.py`` | RoPE | grouped-query, optional QK-norm |
"""

from __future__ import annotations

from .base import CachedAttention, CausalLM, attend, check_token_ids
from .gpt2 import GPT2_PRESETS, GPTConfig, GPTModel
from .llama import LLAMA_PRESETS, Llama3RopeScaling, LlamaConfig, LlamaModel

PRESETS: dict[str, GPTConfig | LlamaConfig] = {**GPT2_PRESETS, **LLAMA_PRESETS}


def build_model(cfg: GPTConfig | LlamaConfig) -> CausalLM:
    """A randomly initialised model of the family that ``cfg`` describes."""
    if isinstance(cfg, GPTConfig):
        return GPTModel(cfg)
    if isinstance(cfg, LlamaConfig):
        return LlamaModel(cfg)
    raise TypeError(f"no kvlib model family takes a {type(cfg).__name__}; "
                    "pass a GPTConfig or a LlamaConfig")


__all__ = ["GPT2_PRESETS", "LLAMA_PRESETS", "PRESETS", "CachedAttention", "CausalLM", "GPTConfig",
           "GPTModel", "Llama3RopeScaling", "LlamaConfig", "LlamaModel", "attend", "build_model",
           "check_token_ids"]
