"""Serving many requests: a padded batch's slots, the engine's block pool at one step, and the KV
memory each way of holding the cache reserves along the engine's run.

    plot_padded_batch([17, 5, 40], [20, 8, 12])            # what a static batch holds
    engine.run(); plot_engine_step(engine, step=10)         # one frame of the scrubber
    plot_serving_memory(engine)                             # reserved vs used, step by step
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.patches import Patch, Rectangle

from .figure import PlotFigure, figure_png

if TYPE_CHECKING:
    from ..serving import Engine  # a finished run: these functions read its records

_SLOT = {"padding": "#dddddd", "prompt": "#aec7e8", "output": "#2ca02c",
         "idle": "#ffbb78"}  # a padded batch's slots
_CMAP = "tab10"


def padded_batch_slots(prompt_lens: Sequence[int], output_lens: Sequence[int]) -> dict:
    """Counts of a static batch's slots at its last step: padding before the shorter prompts,
    prompts, outputs, and ``idle``, the slots of rows that finished before the longest one."""
    T, n = max(prompt_lens), max(output_lens)
    B = len(prompt_lens)
    counts = {"padding": sum(T - p for p in prompt_lens), "prompt": sum(prompt_lens),
              "output": sum(output_lens), "idle": sum(n - m for m in output_lens)}
    counts["total"] = B * (T + n)
    return counts


def plot_padded_batch(prompt_lens: Sequence[int], output_lens: Sequence[int]) -> PlotFigure:
    """A static batch, one row per request: left padding, prompt, output, and the idle slots a
    finished row keeps until the longest one ends."""
    T, n = max(prompt_lens), max(output_lens)
    B = len(prompt_lens)
    fig = PlotFigure(figsize=(7.5, 0.35 * B + 1.4), layout="constrained")
    ax = fig.add_subplot()
    for b, (p, m) in enumerate(zip(prompt_lens, output_lens, strict=True)):
        y = B - 1 - b
        for start, width, kind in ((0, T - p, "padding"), (T - p, p, "prompt"), (T, m, "output"),
                                   (T + m, n - m, "idle")):
            if width:
                ax.add_patch(Rectangle((start, y + 0.1), width, 0.8, color=_SLOT[kind], lw=0))
    ax.axvline(T, color="black", lw=0.8, ls=":")
    c = padded_batch_slots(prompt_lens, output_lens)
    real = c["prompt"] + c["output"]
    ax.set_xlim(0, T + n)
    ax.set_ylim(0, B)
    ax.set_yticks(np.arange(B) + 0.5, [f"request {B - 1 - i}" for i in range(B)])
    ax.set_xlabel("cache slot (token column of the batch)")
    ax.set_title(f"a padded batch: {real} of {c['total']} slots hold a real token "
                 f"({100 * (1 - real / c['total']):.0f}% wasted)", fontsize=10)
    ax.legend(handles=[Patch(color=v, label=k) for k, v in _SLOT.items()], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _request_color(rid: int) -> tuple:
    import matplotlib

    return matplotlib.colormaps[_CMAP](rid % 10)


def plot_engine_step(engine: Engine, step: int, columns: int = 16) -> PlotFigure:
    """The pool after step ``step`` of a finished run: one square per block, coloured by the
    request that holds it and filled as far as its slots are; a block held by several requests
    is hatched and shows how many. Beside it, who joined, ran, finished and waited."""
    rec = engine.history[step]
    pool, bs = engine.pool, engine.pool.block_size
    N = pool.num_blocks
    rows = -(-N // columns)
    owner: dict[int, list[int]] = {}
    filled: dict[int, int] = {}
    for rid, table in rec.tables.items():
        for i, b in enumerate(table):
            owner.setdefault(b, []).append(rid)
            filled[b] = max(filled.get(b, 0), min(bs, rec.filled[rid] - i * bs))
    fig = PlotFigure(figsize=(8.4, 0.42 * rows + 1.9), layout="constrained")
    ax = fig.add_subplot()
    for b in range(N):
        x, y = b % columns, rows - 1 - b // columns
        ax.add_patch(Rectangle((x + 0.05, y + 0.05), 0.9, 0.9, fill=False, lw=0.8,
                               ec="#bbbbbb"))
        if b not in owner:
            continue
        color = _request_color(owner[b][0])
        share = max(filled[b], 0) / bs
        ax.add_patch(Rectangle((x + 0.05, y + 0.05), 0.9 * share, 0.9,
                               color=to_rgba(color, 0.9), lw=0))
        shared = rec.refs[b] > 1
        ax.add_patch(Rectangle((x + 0.05, y + 0.05), 0.9, 0.9, fill=False, lw=1.6 if shared
                               else 1.0, ec="black" if shared else color,
                               hatch="///" if shared else None))
        label = f"x{rec.refs[b]}" if shared else str(owner[b][0])
        ax.text(x + 0.5, y + 0.5, label, ha="center", va="center", fontsize=7,
                color="black", fontweight="bold" if shared else "normal",
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}
                if shared else None)
    ax.set_xlim(0, columns)
    ax.set_ylim(0, rows)
    ax.set_aspect("equal")
    ax.axis("off")
    s = rec.stats
    ax.set_title(
        f"step {rec.step}: {len(rec.tables)} running, {len(rec.waiting)} waiting; "
        f"{s['blocks_used']} of {N} blocks in use ({s['blocks_shared']} shared); "
        f"joined {rec.joined or '-'}, finished {rec.finished or '-'}", fontsize=9)
    fig.text(0.01, 0.01, f"a square is a block of {bs} tokens, coloured by request (number) "
             "and filled as far as its slots are; hatched, xN: shared by N requests",
             fontsize=7.5, color="#555555")
    return fig


def engine_step_pngs(engine: Engine, steps: Sequence[int] | None = None, columns: int = 16,
                     dpi: int = 70) -> list[bytes]:
    """``plot_engine_step`` at each of ``steps`` (default: every step), as PNG bytes (the
    scrubber's frames)."""
    steps = range(len(engine.history)) if steps is None else steps
    return [figure_png(plot_engine_step(engine, s, columns), dpi=dpi) for s in steps]


def serving_memory(engine: Engine) -> dict[str, np.ndarray]:
    """Token slots at every step of a finished run: ``used`` (each running request's tokens,
    counted once per block: shared blocks once), ``paged`` (the blocks in use, whole), and
    ``prealloc`` (a contiguous cache per running request, sized for the longest request)."""
    longest = max(len(r.prompt) + r.max_new_tokens - 1 for r in engine.requests.values())
    s = engine.slots_by_step()
    return {"used": np.array(s["used"]), "paged": np.array(s["paged"]),
            "prealloc": np.array(s["running"]) * longest}


def plot_serving_memory(engine: Engine) -> PlotFigure:
    """KV token slots reserved at every step of the engine's run: paged blocks against one
    contiguous cache per request sized for the longest request, and the slots really used."""
    m = serving_memory(engine)
    steps = np.arange(len(m["used"]))
    fig = PlotFigure(figsize=(7, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, m["prealloc"], color="#2ca02c", label="prealloc per request (longest)")
    ax.plot(steps, m["paged"], color="#1f77b4", label="paged: blocks in use")
    ax.fill_between(steps, m["used"], color="#aec7e8", alpha=0.7, label="slots holding a token")
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV token slots (all layers alike)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig
