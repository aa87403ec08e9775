"""The model families kvlib runs, and one table of named presets across them.

| family | file | positions | attention |
|---|---|---|---|
| GPT-2 | ``gpt2.py`` | learned, a hard limit | multi-head, fused QKV with bias |
| Llama 3 / Qwen3 | ``llama.py`` | RoPE | grouped-query, optional QK-norm, learned sinks |
| Gemma 3 | ``gemma.py`` | RoPE, a base per layer type | grouped-query, 5 local : 1 global |
"""

from __future__ import annotations

from .base import CachedAttention, CausalLM, attend, attend_with, check_token_ids
from .gemma import GEMMA_PRESETS, GemmaConfig, GemmaModel
from .gpt2 import GPT2_PRESETS, GPTConfig, GPTModel
from .llama import LLAMA_PRESETS, Llama3RopeScaling, LlamaConfig, LlamaModel

PRESETS: dict[str, GPTConfig | LlamaConfig | GemmaConfig] = {
    **GPT2_PRESETS, **LLAMA_PRESETS, **GEMMA_PRESETS}


def build_model(cfg: GPTConfig | LlamaConfig | GemmaConfig) -> CausalLM:
    """A randomly initialised model of the family that ``cfg`` describes."""
    if isinstance(cfg, GPTConfig):
        return GPTModel(cfg)
    if isinstance(cfg, LlamaConfig):
        return LlamaModel(cfg)
    if isinstance(cfg, GemmaConfig):
        return GemmaModel(cfg)
    raise TypeError(f"no kvlib model family takes a {type(cfg).__name__}; "
                    "pass a GPTConfig, a LlamaConfig or a GemmaConfig")


__all__ = ["GEMMA_PRESETS", "GPT2_PRESETS", "LLAMA_PRESETS", "PRESETS", "CachedAttention",
           "CausalLM", "GPTConfig", "GPTModel", "GemmaConfig", "GemmaModel", "Llama3RopeScaling",
           "LlamaConfig", "LlamaModel", "attend", "attend_with", "build_model", "check_token_ids"]
