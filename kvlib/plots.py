"""Pictures of the cache at work: plain functions that return a matplotlib ``Figure``.

Each picture has two halves: a function that measures (runs the real model and reads the real
caches) and returns plain data, and a function that draws that data. ``kvlib.widgets`` puts
controls on top of the same functions. Figures are ``PlotFigure``s (a ``matplotlib.figure.Figure``
that shows itself as a PNG), not pyplot figures, so nothing is kept in global state and a notebook
shows each figure exactly once: as the value of the cell's last line.

    runs = cache_frames_for(model, "The cache keeps", 24, ["concat", ("sliding", 8)])
    plot_cache_state(runs, "sliding (window 8)", step=12)
    plot_latency(measure_latency(model, prompt, 100, [None, "concat"]))
    plot_memory("llama-3-8b", context=32768)
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from .generate import generate_stream
from .memory import MODELS, ModelSpec, dtype_bytes, format_bytes, get_spec
from .models import GPTModel
from .style import COLORS, strategy_label
from .tokenizer import decode, encode

StrategySpec = str | None | tuple[str, int]  # "concat", None (no cache), ("sliding", window)

class PlotFigure(Figure):
    """A matplotlib Figure that a notebook shows as a PNG by itself (pyplot not needed)."""

    def _repr_png_(self) -> bytes:
        return figure_png(self, dpi=100, colors=None)


def _split(spec: StrategySpec, window: int | None = None) -> tuple[str | None, int | None]:
    if isinstance(spec, tuple):
        return spec[0], spec[1]
    return spec, window if spec == "sliding" else None


def _as_ids(prompt: str | Sequence[int] | Tensor) -> Tensor:
    if isinstance(prompt, Tensor):
        return prompt if prompt.dim() == 2 else prompt[None]
    ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
    return torch.tensor([ids])  # (1, T)


# --- the cache explorer: one layer's slots, step by step ------------------------------------


@dataclass
class CacheFrame:
    """One layer's cache right after one generation step, as read from the cache itself."""

    step: int  # generate_stream's Step.index: 0 is the prefill
    layer: int
    strategy: str
    window: int | None
    positions: list[int]  # the position each slot of the buffer holds; -1: allocated, empty
    written: list[int]  # slots whose keys changed during this step (compared bit for bit)
    writes: list[int]  # how often each slot has been written so far (> 1: overwritten)
    evicted: list[int]  # positions whose slot was overwritten during this step
    capacity: int | None  # slots the cache can hold (None: grows without bound)
    cache_tokens: int  # cache.get_seq_length(): tokens given to the cache since the reset
    layer_nbytes: int  # bytes held by this layer's cache
    nbytes: int  # bytes held by the caches of all layers (model.kv_cache_nbytes)
    seconds: float  # wall time of the step
    tokens: list[int] = field(default_factory=list)  # the sequence after this step

    @property
    def filled(self) -> int:
        return sum(p >= 0 for p in self.positions)


def _changed_slots(before: Tensor, after: Tensor | None) -> list[int]:
    """Slots of a (B, H, S, D) buffer whose bytes differ between two snapshots (new ones too)."""
    if after is None:
        return []
    common = min(before.shape[2], after.shape[2])
    a = before[:, :, :common].contiguous().view(torch.uint8)  # bytes: NaN-safe comparison
    b = after[:, :, :common].contiguous().view(torch.uint8)
    changed = (a != b).any(dim=3).any(dim=1).any(dim=0)  # (S,)
    return [int(s) for s in changed.nonzero()[:, 0]] + list(range(common, after.shape[2]))


def cache_frames(model: GPTModel, prompt: str | Sequence[int] | Tensor, max_new_tokens: int,
                 strategy: str = "concat", window: int | None = None,
                 layer: int = 0) -> list[CacheFrame]:
    """Generate greedily with one cache strategy and record layer ``layer``'s cache after every
    step: which position each slot holds, which slots the step wrote (found by comparing the key
    buffer before and after), how many bytes the caches hold."""
    if strategy not in ("concat", "prealloc", "sliding"):
        raise ValueError(f"the explorer shows a cache: choose 'concat', 'prealloc' or 'sliding', "
                         f"got {strategy!r}")
    idx = _as_ids(prompt)
    frames, writes = [], []
    before: Tensor | None = None
    old_positions: list[int] = []
    for step in generate_stream(model, idx, max_new_tokens, cache=strategy, window=window):
        cache = model.caches[layer]
        positions = cache.slot_positions()
        if before is None:  # a fresh buffer: its filled slots are the ones this step wrote
            written = [s for s, p in enumerate(positions) if p >= 0]
        else:
            written = _changed_slots(before, cache.keys)
        writes += [0] * (len(positions) - len(writes))
        for s in written:
            writes[s] += 1
        evicted = [old_positions[s] for s in written
                   if s < len(old_positions) and old_positions[s] >= 0]
        idx = torch.cat([idx, step.tokens[:, None]], dim=1)
        frames.append(CacheFrame(
            step.index, layer, strategy, window, positions, written, list(writes), evicted,
            cache.capacity, cache.get_seq_length(), cache.nbytes, step.cache_nbytes,
            step.seconds, idx[0].tolist()))
        before = None if cache.keys is None else cache.keys.clone()
        old_positions = positions
    return frames


def cache_frames_for(model: GPTModel, prompt: str | Sequence[int] | Tensor, max_new_tokens: int,
                     strategies: Sequence[StrategySpec] = ("concat", "prealloc", ("sliding", 8)),
                     layer: int = 0) -> dict[str, list[CacheFrame]]:
    """``cache_frames`` for several strategies, keyed by ``strategy_label``."""
    runs = {}
    for spec in strategies:
        name, window = _split(spec)
        runs[strategy_label(name, window)] = cache_frames(model, prompt, max_new_tokens, name,
                                                          window, layer)
    return runs


@functools.cache
def _charmap() -> frozenset[int]:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(font_manager.findfont("DejaVu Sans")).get_charmap())


def token_text(token_id: int, width: int = 7) -> str:
    """A token as a short label: spaces shown as '␣', newlines as '⏎', unknown glyphs as '?'."""
    s = decode([token_id]).replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
    s = "".join(c if ord(c) in _charmap() else "?" for c in s)
    return s if len(s) <= width else s[: width - 1] + "…"


CACHE_FIGSIZE = (9, 4.2)  # inches: 675 px wide at 75 dpi, about a book page's text column


class _Boxes:
    """Boxes, labels and lines gathered first, then drawn as a few collections (fast). Every
    artist it adds is kept in ``artists`` so a renderer can draw or remove just these."""

    def __init__(self, ax) -> None:
        self.ax = ax
        self.rects: list[tuple[Rectangle, bool]] = []
        self.lines: list[tuple[list[tuple[float, float]], str, float]] = []
        self.artists: list = []

    def box(self, x: float, y: float, color: str, text: str, edge: str = "#555555",
            lw: float = 0.6, ls: str = "-", hatch: bool = False,
            text_color: str = "black") -> None:
        rect = Rectangle((x + 0.05, y), 0.9, 1.0, facecolor=color, edgecolor=edge, lw=lw, ls=ls)
        self.rects.append((rect, hatch))
        if text:
            self.artists.append(self.ax.text(x + 0.5, y + 0.5, text, rotation=90, ha="center",
                                             va="center", fontsize=8, color=text_color))

    def line(self, xy: list[tuple[float, float]], color: str, lw: float) -> None:
        self.lines.append((xy, color, lw))

    def draw(self) -> list:
        for hatched in (False, True):
            rects = [r for r, h in self.rects if h == hatched]
            if rects:
                self.artists.insert(0, self.ax.add_collection(PatchCollection(
                    rects, match_original=True, hatch="///" if hatched else None)))
        if self.lines:
            self.artists.insert(0, self.ax.add_collection(LineCollection(
                [xy for xy, _, _ in self.lines], colors=[c for _, c, _ in self.lines],
                linewidths=[w for _, _, w in self.lines])))
        return self.artists


def _cache_axes(runs: dict[str, list[CacheFrame]], label: str, fig: Figure) -> tuple:
    """The parts of the cache picture that stay the same at every step."""
    frames = runs[label]
    ax, axb = fig.subplots(1, 2, width_ratios=[3.2, 1], gridspec_kw=dict(
        left=0.075, right=0.99, bottom=0.22, top=0.91, wspace=0.2))
    n_pos = len(frames[-1].tokens)  # every position the run will reach
    n_slots = max(len(fr.positions) for fr in frames)
    ax.set_xlim(-0.1, max(n_pos, n_slots) + 0.1)
    ax.set_ylim(-0.15, 3.35)
    ax.set_yticks([0.5, 2.7], ["cache\nslots", "sequence"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("slot / position", labelpad=1)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    keys = [("filled", "holds a token"), ("overwritten", "slot overwritten"),
            ("empty", "empty slot"), ("evicted", "forgotten position")]
    handles = [Patch(facecolor=COLORS[k], edgecolor="#555555", lw=0.6, label=t) for k, t in keys]
    handles += [Patch(facecolor="white", edgecolor=COLORS["written"], lw=2, label="written now"),
                Patch(facecolor="white", edgecolor="#555555", ls="--", label="next input")]
    ax.legend(handles=handles, ncol=3, fontsize=7.5, loc="upper center", frameon=False,
              bbox_to_anchor=(0.5, -0.11), handlelength=1.5, columnspacing=1.2)
    for name, frs in runs.items():  # bytes of all layers, every strategy
        axb.plot([fr.step for fr in frs], [fr.nbytes / 2**20 for fr in frs], label=name,
                 color=COLORS.get(frs[0].strategy), lw=2.2 if name == label else 1.2)
    axb.set_xlabel("step", labelpad=1)
    axb.set_ylabel("MiB held")
    axb.set_ylim(bottom=0)
    axb.legend(fontsize=7, loc="lower right")
    axb.grid(alpha=0.3)
    return ax, axb


def _cache_step(runs: dict[str, list[CacheFrame]], label: str, step: int, ax, axb) -> list:
    """Draw what step ``step`` changes; return the artists added."""
    frames = runs[label]
    f = frames[step]
    n_pos = len(frames[-1].tokens)
    n_slots = max(len(fr.positions) for fr in frames)
    held = {p for p in f.positions if p >= 0}
    written = set(f.written)
    seq = f.tokens
    b = _Boxes(ax)
    for p in range(n_pos):  # the sequence
        if p >= len(seq):  # not generated yet
            b.box(p, 2.2, "white", "", edge="#cccccc", lw=0.4, ls=":")
        elif p >= f.cache_tokens:  # generated in this step: the cache takes it at the next one
            b.box(p, 2.2, "white", token_text(seq[p]), ls="--", lw=1.0)
        elif p in held:
            b.box(p, 2.2, COLORS["filled"], token_text(seq[p]))
        else:  # given to the cache, no longer held: overwritten
            b.box(p, 2.2, COLORS["evicted"], token_text(seq[p]), edge="#b0b0b0", hatch=True,
                  text_color="#555555")
    for s in range(n_slots):  # the cache's slots
        if s >= len(f.positions):
            b.box(s, 0, "white", "", edge="#bbbbbb", lw=0.5, ls="--")
            continue
        p = f.positions[s]
        if p < 0:
            b.box(s, 0, COLORS["empty"], "")
            continue
        color = COLORS["overwritten"] if f.writes[s] > 1 else COLORS["filled"]
        new = s in written
        b.box(s, 0, color, f"{p}: {token_text(seq[p], 5)}",
              edge=COLORS["written"] if new else "#555555", lw=2.2 if new else 0.6)
        b.line([(s + 0.5, 1.0), (p + 0.5, 2.2)], COLORS["written"] if new else "#aaaaaa",
               1.2 if new else 0.5)
    artists = b.draw()
    what = "prefill" if f.step == 0 else "decode"
    wrote = (f"wrote {len(f.written)} slots" if len(f.written) > 3 else
             "wrote slot " + ", ".join(str(s) for s in f.written))
    lost = f", overwrote position {', '.join(map(str, f.evicted))}" if f.evicted else ""
    artists.append(ax.text(0, 1.02, f"{label}, layer {f.layer}, step {f.step} ({what}):"
                           f" {wrote}{lost}; holds {f.filled} tokens", fontsize=8.5,
                           transform=ax.transAxes, va="bottom"))
    for frs in runs.values():
        if step < len(frs):
            artists += axb.plot([frs[step].step], [frs[step].nbytes / 2**20], "o",
                                color=COLORS.get(frs[0].strategy), ms=4)
    artists.append(axb.axvline(f.step, color="#999999", lw=0.8, ls=":"))
    artists.append(axb.text(0.5, 1.02, f"all layers: {format_bytes(f.nbytes)}", fontsize=8.5,
                            ha="center", va="bottom", transform=axb.transAxes))
    return artists


def plot_cache_state(runs: dict[str, list[CacheFrame]], label: str | None = None, step: int = 0,
                     fig: Figure | None = None) -> Figure:
    """One layer's cache of strategy ``label`` after step ``step`` (left) and the bytes held by
    all layers for every strategy in ``runs`` (right).

    Top row: the sequence, one box per position (blue: in the cache, grey hatched: overwritten,
    dashed: the token just generated, fed in at the next step). Bottom row: the cache's slots,
    with the position and token each holds (orange: a slot that has been overwritten, grey: empty,
    dashed: not allocated yet; red edge: written in this step). Lines join a slot to its position.
    """
    label = label or next(iter(runs))
    if not 0 <= step < len(runs[label]):
        raise ValueError(f"step must lie in [0, {len(runs[label])}) for {label!r}, got {step}")
    fig = fig or PlotFigure(figsize=CACHE_FIGSIZE)
    _cache_step(runs, label, step, *_cache_axes(runs, label, fig))
    return fig


def cache_state_pngs(runs: dict[str, list[CacheFrame]], label: str, dpi: int = 75,
                     colors: int | None = 64) -> list[bytes]:
    """``plot_cache_state`` of every step as PNG bytes, a few times faster than one figure per
    step: the parts that never change are drawn once and each step draws only its own artists
    over them (blitting)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = PlotFigure(figsize=CACHE_FIGSIZE, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax, axb = _cache_axes(runs, label, fig)
    canvas.draw()
    background = canvas.copy_from_bbox(fig.bbox)
    pngs = []
    for step in range(len(runs[label])):
        canvas.restore_region(background)
        artists = _cache_step(runs, label, step, ax, axb)
        for a in artists:
            fig.draw_artist(a)
        pngs.append(_encode_png(canvas, colors))
        for a in artists:
            a.remove()
    return pngs


# --- latency -------------------------------------------------------------------------------


@dataclass
class LatencyRun:
    """Per-step wall times of one generation (index 0 is the prefill)."""

    label: str
    strategy: str | None
    window: int | None
    seconds: list[float] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)  # sequence length after each step
    cache_nbytes: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode tokens per second (the prefill excluded), as GenerationResult reports it."""
        s = self.seconds[1:]
        return len(s) / sum(s) if s else float("nan")

    @property
    def ms_per_step(self) -> list[float]:
        return [1000 * t for t in self.seconds]


def measure_latency(model: GPTModel, prompt: str | Sequence[int] | Tensor, max_new_tokens: int,
                    strategies: Sequence[StrategySpec] = (None, "concat"),
                    window: int | None = None,
                    on_step: Callable[[LatencyRun, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> dict[str, LatencyRun]:
    """Generate ``max_new_tokens`` greedily with each strategy in turn, timing every step.

    ``on_step(run, i)`` is called after each step (for live plots); ``should_stop()`` ends the
    measurement early. Returns the runs keyed by ``strategy_label``.
    """
    idx = _as_ids(prompt)
    runs: dict[str, LatencyRun] = {}
    for spec in strategies:
        name, win = _split(spec, window)
        run = runs[strategy_label(name, win)] = LatencyRun(strategy_label(name, win), name, win)
        for step in generate_stream(model, idx, max_new_tokens, cache=name, window=win):
            run.seconds.append(step.seconds)
            run.seq_lens.append(step.seq_len)
            run.cache_nbytes.append(step.cache_nbytes)
            if on_step is not None:
                on_step(run, step.index)
            if should_stop is not None and should_stop():
                return runs
    return runs


def plot_latency(runs: dict[str, LatencyRun], fig: Figure | None = None,
                 title: str | None = None) -> Figure:
    """Milliseconds per decode step against the sequence length (left) and decode tokens per
    second (right) for every run. The prefill (step 0) is left out of both."""
    fig = fig or PlotFigure(figsize=(10, 3.6))
    ax, axb = fig.subplots(1, 2, width_ratios=[2.4, 1], gridspec_kw=dict(
        left=0.07, right=0.95, bottom=0.14, top=0.9, wspace=0.5))
    names, rates, colors = [], [], []
    for name, run in runs.items():
        color = COLORS.get(run.strategy or "none")
        ax.plot(run.seq_lens[1:], run.ms_per_step[1:], label=name, color=color, lw=1.0)
        names.append(name)
        rates.append(run.decode_tokens_per_s if len(run.seconds) > 1 else 0.0)
        colors.append(color)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("ms per step")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or "time per generated token", fontsize=10, loc="left")
    bars = axb.barh(names, rates, color=colors)
    for bar, r in zip(bars, rates, strict=True):
        axb.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r:.0f}", va="center",
                 fontsize=8)
    axb.set_xlabel("decode tokens / s")
    axb.invert_yaxis()
    axb.set_xlim(0, max(rates + [1.0]) * 1.3)
    axb.set_title("throughput", fontsize=10)
    return fig


# --- memory ----------------------------------------------------------------------------------


def plot_memory(model: str | ModelSpec = "llama-3-8b", context: int = 8192, batch: int = 1,
                dtype: str = "bfloat16", fig: Figure | None = None) -> Figure:
    """The KV cache of ``batch`` sequences of ``context`` tokens beside the model's weights (left),
    and the cache against the context length (right)."""
    s = get_spec(model)
    gib = 2**30
    cache = s.cache_bytes(context, batch, dtype)
    fig = fig or PlotFigure(figsize=(10, 3.4))
    ax, axr = fig.subplots(1, 2, width_ratios=[1.2, 1], gridspec_kw=dict(
        left=0.11, right=0.98, bottom=0.15, top=0.88, wspace=0.22))
    names = ["weights", "KV cache"]
    values = [s.weight_bytes(dtype), cache]
    colors = ["#7f7f7f", COLORS["concat"]]
    if s.n_kv_heads != s.n_heads:
        names.append("KV cache\nwithout GQA")
        values.append(s.mha_cache_bytes(context, batch, dtype))
        colors.append("#c5b0d5")
    bars = ax.barh(names, [v / gib for v in values], color=colors)
    for bar, v in zip(bars, values, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + format_bytes(v),
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) / gib * 1.35)
    ax.set_xlabel("GiB")
    ax.set_title(f"{s.name}, {context:,} tokens x batch {batch}, {dtype}", fontsize=10, loc="left")

    top = max(context, s.context_length) * 2
    xs = [2**k for k in range(8, 30) if 2**k <= top]
    axr.plot(xs, [s.cache_bytes(x, batch, dtype) / gib for x in xs], color=COLORS["concat"],
             label="KV cache")
    axr.axhline(s.weight_bytes(dtype) / gib, color="#7f7f7f", ls="--", lw=1, label="weights")
    axr.plot([context], [cache / gib], "o", color=COLORS["written"])
    axr.axvline(s.context_length, color="#bbbbbb", ls=":", lw=1,
                label=f"released context ({s.context_length:,})")
    axr.set_xscale("log", base=2)
    axr.set_yscale("log")
    axr.set_xlabel("context length (tokens)")
    axr.set_ylabel("GiB")
    axr.grid(alpha=0.3, which="both")
    axr.legend(fontsize=7, loc="upper left")
    per_token, nb = s.cache_bytes_per_token(dtype), dtype_bytes(dtype)
    axr.set_title(f"{format_bytes(per_token)} per token = 2 x {s.n_layers} layers x "
                  f"{s.n_kv_heads} kv heads x {s.head_dim} dims x {nb} B", fontsize=8)
    return fig


def plot_cache_sizes(models: Sequence[str | ModelSpec] | None = None,
                     contexts: Sequence[int] = (8192, 32768, 131072), batch: int = 1,
                     dtype: str = "bfloat16", fig: Figure | None = None) -> Figure:
    """Cache size of several models at several context lengths (grouped bars, log scale), with
    each model's weights as a black tick."""
    specs = [get_spec(m) for m in (models or list(MODELS))]
    fig = fig or PlotFigure(figsize=(10, 3.6))
    ax = fig.subplots(gridspec_kw=dict(left=0.08, right=0.98, bottom=0.12, top=0.9))
    gib, width = 2**30, 0.8 / len(contexts)
    for j, t in enumerate(contexts):
        xs = [i + (j - (len(contexts) - 1) / 2) * width for i in range(len(specs))]
        ax.bar(xs, [s.cache_bytes(t, batch, dtype) / gib for s in specs], width,
               label=f"{t:,} tokens")
    ax.scatter(range(len(specs)), [s.weight_bytes(dtype) / gib for s in specs], marker="_",
               s=600, color="black", label="weights", zorder=3)
    ax.set_xticks(range(len(specs)), [s.name for s in specs], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"GiB ({dtype}, batch {batch})")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    ax.set_title("KV cache at each context length, beside the weights", fontsize=10, loc="left")
    return fig


# --- pictures as PNG bytes (for widgets) --------------------------------------------------------


def _encode_png(canvas, colors: int | None) -> bytes:
    from PIL import Image

    img = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    if colors is not None:  # a palette of ``colors`` colors: several times smaller files
        img = img.quantize(colors=colors, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    img.save(out, format="png", compress_level=9)
    return out.getvalue()


def figure_png(fig: Figure, dpi: int = 72, colors: int | None = 64) -> bytes:
    """A figure as PNG bytes; ``colors`` quantizes to a palette (several times smaller files)."""
    if colors is None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return _encode_png(canvas, colors)
