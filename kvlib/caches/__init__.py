"""Every KV-cache strategy, behind one interface, in one package.

| module          | what                                                                      |
|-----------------|---------------------------------------------------------------------------|
| ``base.py``     | ``KVCache`` (the interface), ``Traits``, ``LayerSpec``, ``attention_mask`` |
| ``plain.py``    | "none", "concat", "prealloc", "sliding"                                   |
| ``streaming.py``| "sinks" (attention sinks, StreamingLLM), "recompute" (their baseline)      |
| ``compressed.py``| "bf16", "quantized" (int8 / int4, KIVI), "evict" (H2O)                   |
| ``paged.py``    | "paged": ``BlockStorage`` (every layer's blocks), ``PagedBatch`` (the next |
|                 | forward's tables and slots), ``PagedCache`` (one layer's view) and         |
|                 | ``RowPager`` (an equal batch's blocks with no engine; the engine's books:  |
|                 | ``kvlib.serving``)                                                         |
| ``paged_kernel.py``| the paged decode step's attention, ``paged_attention.c``, read from the |
|                 | blocks where they lie: built with the machine's C compiler, or the gather  |
| ``registry.py`` | ``STRATEGIES``, written out once; ``register``; ``build`` (local layers:   |
|                 | a ring of their own window, ``with_local_layers``)                         |

A new strategy: a ``KVCache`` subclass in the module of its family, with its ``traits``, and one
line in ``registry.STRATEGIES`` (a reader's own: ``kvlib.caches.register("mine", MyCache)``).
"""

from .base import KVCache, LayerSpec, Traits, attention_mask
from .compressed import (
    BFloat16Cache,
    EvictCache,
    QuantizedCache,
    dequantize,
    quantize,
    quantized_nbytes,
)
from .paged import BlockStorage, PagedBatch, PagedCache, RowPager
from .plain import ConcatCache, NoCache, PreallocCache, SlidingWindowCache
from .registry import STRATEGIES, build, register, strategy
from .streaming import N_SINK, RecomputeCache, SinkCache

__all__ = [
    "BFloat16Cache", "BlockStorage", "ConcatCache", "EvictCache", "KVCache", "LayerSpec",
    "N_SINK", "NoCache", "PagedBatch", "PagedCache", "PreallocCache", "QuantizedCache",
    "RecomputeCache", "RowPager", "STRATEGIES", "SinkCache", "SlidingWindowCache", "Traits",
    "attention_mask", "build", "dequantize", "quantize", "quantized_nbytes", "register",
    "strategy",
]
