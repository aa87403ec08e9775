"""Compressing the cache, measured: the keys and values a layer caches, their quantization error
grouped two ways and, for the values, the error that leaves in the attention output
(``attention_output_errors``), the accuracy-memory frontier of quantized and evicting caches
(``CONFIGS``, the caches chapter 10 and ``python -m kvlib.bench compress`` measure), and one
choice of bits, group size and budget (``compression_tradeoff``). ``kvlib.plots.compress`` draws
them.

    keys, values = cached_keys_values(model, ids, layer=2)     # (H_kv, T, D) each
    weights, values = attention_inputs(model, ids, layer=2)    # (H, T, T), (H_kv, T, D)
    points = measure_frontier(model, rows, CONFIGS)
    t = compression_tradeoff(model, rows, bits=4, group_size=32, budget=64)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..caches.compressed import dequantize, quantize, quantized_nbytes
from ..evaluate import perplexity
from ..generate import prefill
from ..models import CausalLM
from ..state import preserved_state

RESIDUAL = 32  # the residual window of the "+ residual" rows (tokens)
CONFIGS: dict[str, dict] = {  # label -> kvlib.perplexity keywords: the frontier's caches
    "bf16": {"cache": "bf16"},
    "int8": {"cache": "quantized", "bits": 8},
    f"int8 + residual {RESIDUAL}": {"cache": "quantized", "bits": 8, "residual": RESIDUAL},
    "int4": {"cache": "quantized", "bits": 4},
    f"int4 + residual {RESIDUAL}": {"cache": "quantized", "bits": 4, "residual": RESIDUAL},
    "evict 128": {"cache": "evict", "budget": 128, "n_sink": 4},
    "evict 64": {"cache": "evict", "budget": 64, "n_sink": 4},
    "evict 32": {"cache": "evict", "budget": 32, "n_sink": 4},
}


@torch.inference_mode()
def cached_keys_values(model: CausalLM, ids: Tensor, layer: int = 0) -> tuple[Tensor, Tensor]:
    """The keys and values ``(H_kv, T, D)`` that layer ``layer`` caches for ``ids`` ``(1, T)``
    (keys as stored: rotated by RoPE in a Llama). The model is handed back as it was."""
    with preserved_state(model):
        model.set_kv_cache("concat")
        model(ids, use_cache=True)
        cache = model.caches[layer]
        return cache.keys[0].float().clone(), cache.values[0].float().clone()


def grouping_errors(keys: Tensor, values: Tensor, bits: int, group_size: int
                    ) -> dict[str, float]:
    """Mean absolute error of dequantized keys and values ``(H, T, D)``, relative to their mean
    absolute value, grouped per channel (``group_size`` tokens share a scale) and per token
    (``group_size`` channels share a scale). ``T`` must be a multiple of ``group_size``."""
    out = {}
    for name, x in (("keys", keys), ("values", values)):
        for axis, dim in (("per channel", 1), ("per token", 2)):
            back = dequantize(*quantize(x, bits, group_size, dim=dim), group_size, dim=dim)
            out[f"{name} {axis}"] = float((back - x).abs().mean() / x.abs().mean())
    return out


@torch.inference_mode()
def attention_inputs(model: CausalLM, ids: Tensor, layer: int = 0) -> tuple[Tensor, Tensor]:
    """The softmax weights ``(H, T, T)`` of layer ``layer`` over ``ids`` ``(1, T)``, from the
    model's own queries and keys, and the values ``(H_kv, T, D)`` they weigh: what attention
    multiplies. Llama-style layers only (``project`` and ``attention_weights``)."""
    attn = model.attention_layers[layer]
    if not (hasattr(attn, "project") and hasattr(attn, "attention_weights")):
        raise TypeError(f"attention_inputs reads a layer's project() and attention_weights(), "
                        f"which {type(attn).__name__} lacks: use a Llama-style model "
                        "(mini-llama, Llama 3, Qwen3)")
    seen = []

    def record(module, args, output):
        seen.append(module.attention_weights(*args[:3])[0])  # (H, T, T)

    with preserved_state(model):
        hook = attn.register_forward_hook(record)
        try:
            model(ids)
        finally:
            hook.remove()
    return seen[0].float(), cached_keys_values(model, ids, layer)[1]


def attention_output_errors(weights: Tensor, values: Tensor, bits: int, group_size: int
                            ) -> dict[str, float]:
    """Mean absolute error of the attention output ``weights @ v`` when the values ``(H_kv, T,
    D)`` are dequantized, relative to the output's mean absolute value, with the values grouped
    per token and per channel; ``weights`` ``(H, T, T)`` (``attention_inputs``), each key/value
    head shared by ``H / H_kv`` query heads. ``T`` must be a multiple of ``group_size``."""
    share = weights.shape[0] // values.shape[0]
    exact = weights @ values.repeat_interleave(share, dim=0)  # (H, T, D)
    out = {}
    for name, dim in (("values per token", 2), ("values per channel", 1)):
        back = dequantize(*quantize(values, bits, group_size, dim=dim), group_size, dim=dim)
        blurred = weights @ back.repeat_interleave(share, dim=0)  # (H, T, D)
        out[name] = float((blurred - exact).abs().mean() / exact.abs().mean())
    return out


@dataclass
class FrontierPoint:
    """One cache on the accuracy-memory frontier: bytes held per sequence after ``tokens``
    tokens, and its perplexity and next-token choices against the full-precision cache's."""

    label: str
    family: str  # "full", "bf16", "quantized", "evict"
    options: dict
    tokens: int
    nbytes: int
    full_nbytes: int
    perplexity: float
    full_perplexity: float
    agreement: float  # share of positions whose argmax equals the full-precision cache's

    @property
    def bytes_ratio(self) -> float:
        return self.nbytes / self.full_nbytes

    @property
    def perplexity_increase(self) -> float:
        """Perplexity over the full-precision cache's, less 1 (0.01 = 1% worse)."""
        return self.perplexity / self.full_perplexity - 1


def family(options: Mapping) -> str:
    cache = options.get("cache", "concat")
    return {"concat": "full", "prealloc": "full"}.get(cache, cache)


@torch.inference_mode()
def bytes_after(model: CausalLM, ids: Tensor, **options) -> int:
    """Bytes the caches of every layer hold after prefilling ``ids`` ``(B, T)`` (one call, or a
    first chunk then one token at a time for a cache with a ``prefill_limit``)."""
    opts = dict(options)
    cache = opts.pop("cache", "concat")
    window = opts.pop("window", None)
    with preserved_state(model):
        model.set_kv_cache(cache, max_len=ids.shape[1], window=window, **opts)
        prefill(model, ids)
        return model.kv_cache_nbytes


def measure_frontier(model: CausalLM, rows: Tensor, configs: Mapping[str, Mapping],
                     full: Mapping | None = None) -> list[FrontierPoint]:
    """Stream ``rows`` ``(B, T)`` through the model with each cache of ``configs`` (label ->
    ``kvlib.perplexity`` keywords: ``cache=`` and its options) and with the full-precision cache
    (``full``, default ``{"cache": "concat"}``); bytes are read after prefilling one row."""
    full = dict(full or {"cache": "concat"})
    ref = perplexity(model, rows, **full)
    full_nbytes = bytes_after(model, rows[:1], **full)
    points = [FrontierPoint("fp32 (full)", "full", full, rows.shape[1], full_nbytes, full_nbytes,
                            ref.perplexity, ref.perplexity, 1.0)]
    for label, opts in configs.items():
        r = perplexity(model, rows, **opts)
        agree = float((r.top1 == ref.top1).float().mean())
        points.append(FrontierPoint(label, family(opts), dict(opts), rows.shape[1],
                                    bytes_after(model, rows[:1], **opts), full_nbytes,
                                    r.perplexity, ref.perplexity, agree))
    return points


@dataclass
class Tradeoff:
    """One choice of bits, group size and eviction budget, measured (``compression_tradeoff``)."""

    bits: int
    group_size: int
    budget: int
    tokens: int
    full_nbytes: int
    quantized_nbytes: int
    evict_nbytes: int
    errors: dict[str, float]  # grouping_errors of the keys and values, mean over the layers
    full_perplexity: float
    quantized_perplexity: float
    evict_perplexity: float


def compression_tradeoff(model: CausalLM, rows: Tensor, bits: int = 4, group_size: int = 32,
                         budget: int = 64, n_sink: int = 4) -> Tradeoff:
    """Bytes after ``rows.shape[1]`` tokens and perplexity over ``rows`` ``(B, T)`` for the
    quantized cache (``bits``, ``group_size``, no residual) and the evicting one (``budget``,
    ``n_sink`` sinks, half the rest a recent window), against the full cache; and the relative
    error of the keys and values grouped per channel and per token (mean over the layers)."""
    c = model.cfg
    T = rows.shape[1]
    ids = rows[:1, : T // group_size * group_size]
    per_layer = [grouping_errors(*cached_keys_values(model, ids, layer), bits, group_size)
                 for layer in range(c.n_layers)]
    errors = {k: sum(e[k] for e in per_layer) / len(per_layer) for k in per_layer[0]}
    quant = {"cache": "quantized", "bits": bits, "group_size": group_size}
    evict = {"cache": "evict", "budget": budget, "n_sink": n_sink}
    kv_heads = getattr(c, "n_kv_heads", c.n_heads)
    return Tradeoff(
        bits, group_size, budget, T,
        full_nbytes=bytes_after(model, rows[:1]),
        quantized_nbytes=c.n_layers * quantized_nbytes(T, kv_heads, c.head_dim, bits,
                                                       group_size),
        evict_nbytes=bytes_after(model, rows[:1], **evict),
        errors=errors,
        full_perplexity=perplexity(model, rows, cache="concat").perplexity,
        quantized_perplexity=perplexity(model, rows, **quant).perplexity,
        evict_perplexity=perplexity(model, rows, **evict).perplexity,
    )
