"""Draw one layer's cache at one step (from ``CacheFrame``s): the sequence, the cache's slots and
which slot holds which position, beside the bytes every strategy holds.

``plot_cache_state`` draws one step as a figure; ``cache_state_pngs`` draws every step as PNG
bytes for the cache explorer, drawing the parts that never change once.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from ..memory import format_bytes
from ..style import COLORS, strategy_color
from ..tokenizer import decode
from .figure import PlotFigure, canvas_png

if TYPE_CHECKING:
    from ..measure.frames import CacheFrame

    Runs = dict[str, list[CacheFrame]]  # strategy label -> one frame per step

CACHE_FIGSIZE = (9, 4.2)  # inches: 675 px wide at 75 dpi, about a book page's text column
SEQUENCE_ROW, SLOT_ROW = 2.2, 0.0  # where the two rows of boxes sit (each box is 1 high)



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


class _Boxes:
    """Boxes, labels and lines gathered first, then drawn as a few collections (one artist per
    collection, not one per box). Every artist it adds is kept in ``artists`` so a renderer can
    draw or remove just these."""

    def __init__(self, ax) -> None:
        self.ax = ax
        self.rects: list[tuple[Rectangle, bool]] = []
        self.lines: list[tuple[list[tuple[float, float]], str, float]] = []
        self.artists: list = []

    def box(self, x: float, y: float, color: str, text: str, edge: str = COLORS["outline"],
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


def _run_extent(frames: list[CacheFrame]) -> tuple[int, int]:
    """Positions the run reaches and the most slots its cache ever has."""
    return len(frames[-1].tokens), max(len(fr.positions) for fr in frames)


def _style_cache_axes(ax, frames: list[CacheFrame]) -> None:
    """The left panel's axes, ticks and legend."""
    n_positions, n_slots = _run_extent(frames)
    ax.set_xlim(-0.1, max(n_positions, n_slots) + 0.1)
    ax.set_ylim(-0.15, 3.35)
    ax.set_yticks([SLOT_ROW + 0.5, SEQUENCE_ROW + 0.5], ["cache\nslots", "sequence"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("slot / position", labelpad=1)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    keys = [("filled", "holds a token"), ("overwritten", "slot overwritten"),
            ("empty", "empty slot"), ("evicted", "forgotten position")]
    handles = [Patch(facecolor=COLORS[k], edgecolor=COLORS["outline"], lw=0.6, label=t)
               for k, t in keys]
    handles += [Patch(facecolor="white", edgecolor=COLORS["written"], lw=2, label="written now"),
                Patch(facecolor="white", edgecolor=COLORS["outline"], ls="--",
                      label="next input")]
    ax.legend(handles=handles, ncol=3, fontsize=7.5, loc="upper center", frameon=False,
              bbox_to_anchor=(0.5, -0.11), handlelength=1.5, columnspacing=1.2)


def _plot_bytes_held(ax_bytes, runs: Runs, label: str) -> None:
    """The right panel: bytes held by all layers at every step, one line per strategy."""
    for name, frames in runs.items():
        ax_bytes.plot([fr.step for fr in frames], [fr.nbytes / 2**20 for fr in frames],
                      label=name, color=strategy_color(frames[0].strategy),
                      lw=2.2 if name == label else 1.2)
    ax_bytes.set_xlabel("step", labelpad=1)
    ax_bytes.set_ylabel("MiB held")
    ax_bytes.set_ylim(bottom=0)
    ax_bytes.legend(fontsize=7, loc="lower right")
    ax_bytes.grid(alpha=0.3)


def _cache_axes(runs: Runs, label: str, fig: Figure) -> tuple:
    """The parts of the cache picture that stay the same at every step."""
    ax, ax_bytes = fig.subplots(1, 2, width_ratios=[3.2, 1], gridspec_kw=dict(
        left=0.075, right=0.99, bottom=0.22, top=0.91, wspace=0.2))
    _style_cache_axes(ax, runs[label])
    _plot_bytes_held(ax_bytes, runs, label)
    return ax, ax_bytes


def _sequence_row(boxes: _Boxes, frame: CacheFrame, n_positions: int) -> None:
    """One box per position: in the cache, overwritten, just generated, or not generated yet."""
    held = {p for p in frame.positions if p >= 0}
    seq, y = frame.tokens, SEQUENCE_ROW
    for p in range(n_positions):
        if p >= len(seq):  # not generated yet
            boxes.box(p, y, "white", "", edge=COLORS["outline-future"], lw=0.4, ls=":")
        elif p >= frame.cache_tokens:  # generated in this step: the cache takes it at the next
            boxes.box(p, y, "white", token_text(seq[p]), ls="--", lw=1.0)
        elif p in held:
            boxes.box(p, y, COLORS["filled"], token_text(seq[p]))
        else:  # given to the cache, no longer held: overwritten
            boxes.box(p, y, COLORS["evicted"], token_text(seq[p]), edge=COLORS["outline-evicted"],
                      hatch=True, text_color=COLORS["outline"])


def _slot_row(boxes: _Boxes, frame: CacheFrame, n_slots: int) -> None:
    """One box per slot with the position and token it holds, and a line up to that position."""
    written = set(frame.written)
    for s in range(n_slots):
        if s >= len(frame.positions):  # not allocated yet
            boxes.box(s, SLOT_ROW, "white", "", edge=COLORS["outline-unallocated"], lw=0.5,
                      ls="--")
            continue
        p = frame.positions[s]
        if p < 0:
            boxes.box(s, SLOT_ROW, COLORS["empty"], "")
            continue
        color = COLORS["overwritten"] if frame.writes[s] > 1 else COLORS["filled"]
        new = s in written
        boxes.box(s, SLOT_ROW, color, f"{p}: {token_text(frame.tokens[p], 5)}",
                  edge=COLORS["written"] if new else COLORS["outline"], lw=2.2 if new else 0.6)
        boxes.line([(s + 0.5, SLOT_ROW + 1.0), (p + 0.5, SEQUENCE_ROW)],
                   COLORS["written"] if new else COLORS["slot-link"], 1.2 if new else 0.5)


def _step_caption(frame: CacheFrame, label: str) -> str:
    """What the step did, in words: "concat, layer 0, step 3 (decode): wrote slot 7; ..."."""
    what = "prefill" if frame.step == 0 else "decode"
    wrote = (f"wrote {len(frame.written)} slots" if len(frame.written) > 3 else
             "wrote slot " + ", ".join(str(s) for s in frame.written))
    lost = f", overwrote position {', '.join(map(str, frame.evicted))}" if frame.evicted else ""
    return (f"{label}, layer {frame.layer}, step {frame.step} ({what}): {wrote}{lost}; "
            f"holds {frame.filled} tokens")


def _mark_step_bytes(ax_bytes, runs: Runs, step: int, frame: CacheFrame) -> list:
    """Dots for every strategy's bytes at ``step``, a line at the step, the total as a title."""
    artists = []
    for frames in runs.values():
        if step < len(frames):
            artists += ax_bytes.plot([frames[step].step], [frames[step].nbytes / 2**20], "o",
                                     color=strategy_color(frames[0].strategy), ms=4)
    artists.append(ax_bytes.axvline(frame.step, color=COLORS["step-marker"], lw=0.8, ls=":"))
    artists.append(ax_bytes.text(0.5, 1.02, f"all layers: {format_bytes(frame.nbytes)}",
                                 fontsize=8.5, ha="center", va="bottom",
                                 transform=ax_bytes.transAxes))
    return artists


def _cache_step(runs: Runs, label: str, step: int, ax, ax_bytes) -> list:
    """Draw what step ``step`` changes; return the artists added."""
    frames = runs[label]
    frame = frames[step]
    n_positions, n_slots = _run_extent(frames)
    boxes = _Boxes(ax)
    _sequence_row(boxes, frame, n_positions)
    _slot_row(boxes, frame, n_slots)
    artists = boxes.draw()
    artists.append(ax.text(0, 1.02, _step_caption(frame, label), fontsize=8.5,
                           transform=ax.transAxes, va="bottom"))
    return artists + _mark_step_bytes(ax_bytes, runs, step, frame)


def plot_cache_state(runs: Runs, label: str | None = None, step: int = 0,
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


def cache_state_pngs(runs: Runs, label: str, dpi: int = 75,
                     colors: int | None = 64) -> list[bytes]:
    """``plot_cache_state`` of every step as PNG bytes. The parts that never change are drawn
    once; each step draws only its own artists over a copy of them (blitting)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = PlotFigure(figsize=CACHE_FIGSIZE, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax, ax_bytes = _cache_axes(runs, label, fig)
    canvas.draw()
    background = canvas.copy_from_bbox(fig.bbox)
    pngs = []
    for step in range(len(runs[label])):
        canvas.restore_region(background)
        artists = _cache_step(runs, label, step, ax, ax_bytes)
        for artist in artists:
            fig.draw_artist(artist)
        pngs.append(canvas_png(canvas, colors))
        for artist in artists:
            artist.remove()
    return pngs
