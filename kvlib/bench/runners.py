"""The generation loops a run times, all with one shape: ``stream(idx, n)`` yields ``(tokens,
seconds)`` per new token (the first is the prefill), and ``cache_nbytes()`` says what the cache
holds afterwards. kvlib's loop with each strategy, and transformers' GPT-2 with its own caches."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator

import torch
from torch import Tensor

from ..compiling import decoding
from ..generate import generate_stream
from ..hf import to_transformers as hf_twin  # noqa: F401  (the benchmarks' name for it)
from ..models import CausalLM
from ..sampling import greedy
from ..timing import Stopwatch


def weight_sharing_copy(model: CausalLM) -> CausalLM:
    """A copy of ``model`` with caches of its own and the same weight tensors: two loops that
    take turns each keep their caches, and neither reads weights the other leaves cold."""
    return copy.deepcopy(model, {id(p): p for p in model.parameters()})


class KvlibRunner:
    """kvlib's own generation loop (``generate_stream``) with one cache strategy; ``compile``:
    through the compiled model, as ``generate(..., compile=True)`` runs it."""

    def __init__(self, model: CausalLM, strategy: str, window: int, compile: bool = False
                 ) -> None:
        self.model, self.strategy, self.compile = model, strategy, compile
        self.window = window if strategy == "sliding" else None

    def stream(self, idx: Tensor, n: int) -> Iterator[tuple[Tensor, float]]:
        cache = None if self.strategy == "none" else self.strategy
        with decoding(self.model, cache, self.compile) as model:
            for step in generate_stream(model, idx, n, cache=cache, window=self.window):
                yield step.tokens, step.seconds

    def cache_nbytes(self) -> int:
        return self.model.kv_cache_nbytes


class HFRunner:
    """A transformers model (GPT-2, Llama or Qwen3) in the same loop shape: prefill, then one
    token per step, logits for the last position only, greedy; the timer covers forward and
    argmax, as kvlib's."""

    def __init__(self, hf, kind: str) -> None:
        self.hf, self.kind, self.cache = hf, kind, None
        # transformers 5 renamed past_key_values to cache
        params = inspect.signature(hf.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def new_cache(self, batch: int, max_len: int):
        from transformers import DynamicCache, StaticCache

        if self.kind == "hf-dynamic":
            return DynamicCache(config=self.hf.config)
        try:
            return StaticCache(config=self.hf.config, max_cache_len=max_len)
        except TypeError:  # transformers 4.x also wants the batch size
            return StaticCache(config=self.hf.config, max_batch_size=batch,
                               max_cache_len=max_len)

    @torch.inference_mode()
    def stream(self, idx: Tensor, n: int) -> Iterator[tuple[Tensor, float]]:
        self.cache = self.new_cache(idx.shape[0], idx.shape[1] + n)
        nxt = idx
        for _ in range(n):
            with Stopwatch(idx.device) as sw:
                out = self.hf(input_ids=nxt, use_cache=True, logits_to_keep=1,
                              **{self.cache_kw: self.cache})
                nxt = greedy(out.logits[:, -1, :])  # (B, 1), kvlib's argmax
            yield nxt[:, 0], sw.seconds

    def cache_nbytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return total


def time_run(runner, idx: Tensor, n: int) -> dict:
    """One generation of ``n`` tokens: tokens, prefill seconds, decode step seconds, wall time."""
    tokens, times = [], []
    with Stopwatch(idx.device) as wall:
        for tok, seconds in runner.stream(idx, n):
            tokens.append(tok)
            times.append(seconds)
    return {"tokens": torch.stack(tokens, dim=1).cpu(), "prefill": times[0], "steps": times[1:],
            "wall": wall.seconds}
