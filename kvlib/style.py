"""One palette and one spelling for every picture and table: a strategy has the same colour and
the same name in the chapters' plots, the widgets and the benchmark figures."""

from __future__ import annotations

NO_CACHE = "no cache"  # how "none" / None is spelled for a reader

COLORS = {
    # cache strategies (kvlib) and the reference implementations they are measured against
    "none": "#7f7f7f", "concat": "#1f77b4", "prealloc": "#2ca02c", "sliding": "#9467bd",
    "sinks": "#c51b7d", "recompute": "#17becf", "sink": "#f1b6da",
    "hf-dynamic": "#ff7f0e", "hf-static": "#8c564b", "floor": "#000000",
    # cache pictures: what a slot holds
    "filled": "#aec7e8", "overwritten": "#ffbb78", "empty": "#eeeeee", "written": "#d62728",
    "evicted": "#dddddd",
    # cache pictures: outlines, the line from a slot to its position, the current-step marker
    "outline": "#555555", "outline-evicted": "#b0b0b0", "outline-unallocated": "#bbbbbb",
    "outline-future": "#cccccc", "slot-link": "#aaaaaa", "step-marker": "#999999",
    # memory pictures
    "weights": "#7f7f7f", "cache-without-gqa": "#c5b0d5", "context-limit": "#bbbbbb",
    # RoPE pictures: a key's arrow at the first position fades into its arrow at the last
    "rope-first": "#aec7e8", "rope-last": "#08306b",
    # the models trained here (loss curves)
    "mini-gpt2": "#1f77b4", "mini-llama": "#d62728",
}


def strategy_color(strategy: str | None) -> str:
    """The colour of a strategy (None and "none" are the no-cache baseline)."""
    return COLORS.get("none" if strategy is None else strategy, "#17becf")


def strategy_label(strategy: str | None, window: int | None = None,
                   n_sink: int | None = None) -> str:
    """The name a strategy gets in legends and menus: "no cache", "concat", "sliding (window 8)",
    "sinks (4 + window 64)"."""
    if strategy in (None, "none"):
        return NO_CACHE if window is None else f"{NO_CACHE} (window {window})"
    if strategy == "sinks" and window:
        return f"sinks ({4 if n_sink is None else n_sink} + window {window})"
    if strategy == "recompute" and window:
        return f"recompute (window {window})"
    return f"{strategy} (window {window})" if strategy == "sliding" and window else strategy
