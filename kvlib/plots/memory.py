"""How big KV caches get: one model's cache beside its weights, and several models side by side.

The numbers come from ``kvlib.memory`` (the cache-size formula and published model sizes); these
functions only draw them.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from ..memory import MODELS, ModelSpec, dtype_bytes, format_bytes, get_spec
from ..style import COLORS
from .figure import PlotFigure

GIB = 2**30


def _plot_cache_beside_weights(ax, spec: ModelSpec, context: int, batch: int,
                               dtype: str) -> None:
    """Bars: the weights, the KV cache, and the cache it would be without GQA (if it has GQA)."""
    names = ["weights", "KV cache"]
    sizes = [spec.weight_bytes(dtype), spec.cache_bytes(context, batch, dtype)]
    colors = [COLORS["weights"], COLORS["concat"]]
    if spec.n_kv_heads != spec.n_heads:
        names.append("KV cache\nwithout GQA")
        sizes.append(spec.mha_cache_bytes(context, batch, dtype))
        colors.append(COLORS["cache-without-gqa"])
    bars = ax.barh(names, [size / GIB for size in sizes], color=colors)
    for bar, size in zip(bars, sizes, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + format_bytes(size),
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(sizes) / GIB * 1.35)
    ax.set_xlabel("GiB")
    ax.set_title(f"{spec.name}, {context:,} tokens x batch {batch}, {dtype}", fontsize=10,
                 loc="left")


def _plot_cache_against_context(ax, spec: ModelSpec, context: int, batch: int,
                                dtype: str) -> None:
    """The cache at every power-of-two context length (log-log), the weights as a dashed line."""
    top = max(context, spec.context_length) * 2
    lengths = [2**k for k in range(8, 30) if 2**k <= top]
    ax.plot(lengths, [spec.cache_bytes(n, batch, dtype) / GIB for n in lengths],
            color=COLORS["concat"], label="KV cache")
    ax.axhline(spec.weight_bytes(dtype) / GIB, color=COLORS["weights"], ls="--", lw=1,
               label="weights")
    ax.plot([context], [spec.cache_bytes(context, batch, dtype) / GIB], "o",
            color=COLORS["written"])
    ax.axvline(spec.context_length, color=COLORS["context-limit"], ls=":", lw=1,
               label=f"released context ({spec.context_length:,})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("GiB")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    per_token = spec.cache_bytes_per_token(dtype)
    ax.set_title(f"{format_bytes(per_token)} per token = 2 x {spec.n_layers} layers x "
                 f"{spec.n_kv_heads} kv heads x {spec.head_dim} dims x {dtype_bytes(dtype)} B",
                 fontsize=8)


def plot_memory(model: str | ModelSpec = "llama-3-8b", context: int = 8192, batch: int = 1,
                dtype: str = "bfloat16", fig: Figure | None = None) -> Figure:
    """The KV cache of ``batch`` sequences of ``context`` tokens beside the model's weights (left),
    and the cache against the context length (right)."""
    spec = get_spec(model)
    fig = fig or PlotFigure(figsize=(10, 3.4))
    ax_bars, ax_curve = fig.subplots(1, 2, width_ratios=[1.2, 1], gridspec_kw=dict(
        left=0.11, right=0.98, bottom=0.15, top=0.88, wspace=0.22))
    _plot_cache_beside_weights(ax_bars, spec, context, batch, dtype)
    _plot_cache_against_context(ax_curve, spec, context, batch, dtype)
    return fig


def plot_cache_sizes(models: Sequence[str | ModelSpec] | None = None,
                     contexts: Sequence[int] = (8192, 32768, 131072), batch: int = 1,
                     dtype: str = "bfloat16", fig: Figure | None = None) -> Figure:
    """Cache size of several models at several context lengths (grouped bars, log scale), with
    each model's weights as a black tick."""
    specs = [get_spec(m) for m in (models or list(MODELS))]
    fig = fig or PlotFigure(figsize=(10, 3.6))
    ax = fig.subplots(gridspec_kw=dict(left=0.08, right=0.98, bottom=0.12, top=0.9))
    width = 0.8 / len(contexts)
    for j, tokens in enumerate(contexts):
        xs = [i + (j - (len(contexts) - 1) / 2) * width for i in range(len(specs))]
        ax.bar(xs, [s.cache_bytes(tokens, batch, dtype) / GIB for s in specs], width,
               label=f"{tokens:,} tokens")
    ax.scatter(range(len(specs)), [s.weight_bytes(dtype) / GIB for s in specs], marker="_",
               s=600, color="black", label="weights", zorder=3)
    ax.set_xticks(range(len(specs)), [s.name for s in specs], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"GiB ({dtype}, batch {batch})")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    ax.set_title("KV cache at each context length, beside the weights", fontsize=10, loc="left")
    return fig


def plot_layouts(layouts: dict[str, ModelSpec], batch: int = 1, dtype: str = "bfloat16",
                 top: int = 131072, fig: Figure | None = None) -> Figure:
    """One cache against the context length (log-log) for each layout of a model (every layer
    global, local layers with a window, a latent...): where a window makes the line bend."""
    fig = fig or PlotFigure(figsize=(8, 3.4))
    ax = fig.subplots(gridspec_kw=dict(left=0.1, right=0.98, bottom=0.15, top=0.88))
    lengths = [2**k for k in range(7, 30) if 2**k <= top]
    for label, spec in layouts.items():
        ax.plot(lengths, [spec.cache_bytes(n, batch, dtype) / GIB for n in lengths],
                marker=".", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in context")
    ax.set_ylabel(f"KV cache, GiB ({dtype})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("The cache against the context, layout by layout", fontsize=10, loc="left")
    return fig
