"""kvlib: GPT-2, KV-cache strategies and generation for the course "KV Cache from Scratch"."""

from .cache import (
    STRATEGIES,
    ConcatCache,
    KVCache,
    NoCache,
    PreallocCache,
    SlidingWindowCache,
    attention_mask,
)
from .config import PRESETS, GPTConfig
from .course import REPO_URL, environment, load_model, show_source
from .generate import GenerationResult, Step, decode_one, generate, generate_stream, prefill, sample
from .model import GPTModel
from .tokenizer import EOT_ID, decode, encode, get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "EOT_ID", "PRESETS", "REPO_URL", "STRATEGIES", "ConcatCache", "GPTConfig", "GPTModel",
    "GenerationResult", "KVCache", "NoCache", "PreallocCache", "SlidingWindowCache", "Step",
    "attention_mask", "decode", "decode_one", "encode", "environment", "generate",
    "generate_stream", "get_tokenizer", "load_model", "prefill", "sample", "show_source",
]
