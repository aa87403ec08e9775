"""kvlib: GPT-2 and Llama-style models, KV-cache strategies and generation for the course
"KV Cache from Scratch"."""

from . import caches
from .caches import (
    STRATEGIES,
    BFloat16Cache,
    ConcatCache,
    EvictCache,
    KVCache,
    NoCache,
    PagedCache,
    PreallocCache,
    QuantizedCache,
    RecomputeCache,
    SinkCache,
    SlidingWindowCache,
    attention_mask,
)
from .check import CacheCheckError, check_absorbed, check_cache
from .check_compress import check_quantizer, check_victims
from .check_measure import check_payback
from .course import REPO_URL, show_source
from .evaluate import Perplexity, attention_to_first, held_out, perplexity
from .generate import (
    GenerationResult,
    Speculation,
    Step,
    beam_search,
    decode_one,
    generate,
    generate_stream,
    pad_prompts,
    prefill,
    sample,
    speculative_stream,
)
from .loading import load_model
from .machine import environment
from .models import (
    PRESETS,
    CausalLM,
    DeepseekConfig,
    DeepseekModel,
    GPTConfig,
    GPTModel,
    LlamaConfig,
    LlamaModel,
)
from .passkey import Recall, recall
from .serving import BlockPool, Engine
from .timing import Stopwatch, device_sync
from .tokenizer import (
    EOT_ID,
    GPT2Tokenizer,
    Tokenizer,
    decode,
    encode,
    get_tokenizer,
    tokenizer_for,
)
from .vocab import TrimmedTokenizer

__version__ = "0.1.0"

__all__ = [
    "BFloat16Cache", "BlockPool", "CacheCheckError", "EOT_ID", "Engine", "EvictCache",
    "PagedCache", "QuantizedCache", "RecomputeCache", "SinkCache", "caches", "PRESETS",
    "REPO_URL", "STRATEGIES", "CausalLM",
    "ConcatCache", "DeepseekConfig", "DeepseekModel",
    "GPT2Tokenizer", "GPTConfig", "GPTModel", "GenerationResult", "KVCache", "LlamaConfig",
    "LlamaModel", "NoCache", "Perplexity", "PreallocCache", "SlidingWindowCache", "Step",
    "Stopwatch", "Tokenizer", "TrimmedTokenizer", "attention_mask", "check_cache", "decode",
    "decode_one", "device_sync", "pad_prompts", "encode", "environment", "generate",
    "generate_stream",
    "attention_to_first", "get_tokenizer", "held_out", "load_model", "perplexity", "prefill",
    "Recall", "recall", "sample", "show_source", "tokenizer_for", "Speculation", "beam_search",
    "speculative_stream", "check_absorbed", "check_payback", "check_quantizer", "check_victims",
]
