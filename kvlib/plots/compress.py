"""Compressing the cache: the keys' outlier channels, the accuracy-memory frontier of quantized and
evicting caches, and one choice of bits, group size and budget measured.

    keys, values = cached_keys_values(model, ids, layer=2)     # (H_kv, T, D) each
    plot_channel_magnitudes(keys, values)
    points = measure_frontier(model, rows, {"int8": {"cache": "quantized", "bits": 8}, ...})
    plot_frontier(points)
    plot_compression(compression_tradeoff(model, rows, bits=4, group_size=32, budget=64))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..caches.compressed import dequantize, quantize, quantized_nbytes
from ..evaluate import perplexity
from ..generate import prefill
from ..models import CausalLM
from ..state import preserved_state
from ..style import COLORS
from .figure import PlotFigure

FAMILY_STYLE = {  # marker and colour per kind of cache
    "full": ("o", COLORS["concat"]), "bf16": ("D", COLORS["prealloc"]),
    "quantized": ("s", COLORS["sinks"]), "evict": ("^", COLORS["hf-dynamic"]),
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


def plot_channel_magnitudes(keys: Tensor, values: Tensor, head: int = 0) -> PlotFigure:
    """``|keys|`` and ``|values|`` of one head, token by channel: keys show a few channels large
    in every token (columns), values no such pattern."""
    fig = PlotFigure(figsize=(8.0, 3.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (name, x) in zip(axes, (("keys", keys), ("values", values)), strict=True):
        a = x[head].abs().numpy()  # (T, D)
        im = ax.imshow(a, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"|{name}|, head {head}: largest {a.max():.1f}, median {np.median(a):.2f}",
                     fontsize=9)
        ax.set_xlabel("channel")
        fig.colorbar(im, ax=ax, shrink=0.85)
    axes[0].set_ylabel("token")
    return fig


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


def plot_frontier(points: list[FrontierPoint], targets: Mapping[str, float] | None = None
                  ) -> PlotFigure:
    """Perplexity increase over the full-precision cache against the bytes held (a fraction of
    the full cache's), one marker per cache; ``targets``: label -> a perplexity increase to draw
    as a dotted line."""
    fig = PlotFigure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    seen = set()
    for p in points:
        marker, color = FAMILY_STYLE.get(p.family, ("o", "C0"))
        y = max(p.perplexity_increase * 100, 1e-3)  # %, on a log axis
        ax.scatter(p.bytes_ratio, y, marker=marker, color=color, s=46, zorder=3,
                   label=None if p.family in seen else p.family)
        seen.add(p.family)
        ax.annotate(p.label, (p.bytes_ratio, y), xytext=(5, 3), textcoords="offset points",
                    fontsize=7.5)
    for name, value in (targets or {}).items():
        ax.axhline(value * 100, color="#999999", lw=0.8, ls=":")
        ax.annotate(name, (1.0, value * 100), xytext=(-2, 2), textcoords="offset points",
                    ha="right", fontsize=7.5, color="#777777")
    ax.set_yscale("log")
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(f"bytes held after {points[0].tokens} tokens (fraction of the full cache)")
    ax.set_ylabel("perplexity above the full cache's (%)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("lower left is better: less memory, less damage (0.001% = no change)",
                 fontsize=9)
    return fig


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


def plot_compression(t: Tradeoff) -> PlotFigure:
    """Bytes held (left) and perplexity above the full cache's (right) for one ``Tradeoff``."""
    fig = PlotFigure(figsize=(8.0, 3.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    names = ["full (fp32)", f"int{t.bits}, group {t.group_size}", f"evict, budget {t.budget}"]
    colors = [FAMILY_STYLE[f][1] for f in ("full", "quantized", "evict")]
    kib = [t.full_nbytes / 1024, t.quantized_nbytes / 1024, t.evict_nbytes / 1024]
    left.barh(names, kib, color=colors)
    for i, v in enumerate(kib):
        left.annotate(f"{v:,.0f} KiB ({v / kib[0]:.2f}x)", (v, i), xytext=(3, 0),
                      textcoords="offset points", va="center", fontsize=8)
    left.set_xlim(0, kib[0] * 1.6)
    left.invert_yaxis()
    left.set_xlabel(f"cache bytes after {t.tokens} tokens (KiB, every layer)")
    up = [0.0, t.quantized_perplexity / t.full_perplexity - 1,
          t.evict_perplexity / t.full_perplexity - 1]
    right.barh(names, [100 * u for u in up], color=colors)
    for i, u in enumerate(up):
        right.annotate(f"{100 * u:+.2f}%", (max(100 * u, 0), i), xytext=(3, 0),
                       textcoords="offset points", va="center", fontsize=8)
    right.set_xlim(0, max(100 * max(up), 1.0) * 1.35)
    right.invert_yaxis()
    right.set_yticks([])
    right.set_xlabel("perplexity above the full cache's (%)")
    return fig
