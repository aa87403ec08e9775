"""Pictures of the cache at work: plain functions that draw what they are given.

Nothing here runs a model: ``kvlib.measure`` measures (runs the real model, reads the real caches)
and returns plain data, and a function here draws that data; ``kvlib.widgets`` puts controls on
top of both. Figures are ``PlotFigure``s (a ``matplotlib.figure.Figure`` that shows itself as a
PNG), not pyplot figures, so nothing is kept in global state and a notebook shows each figure
exactly once: as the value of the cell's last line.

    runs = cache_frames_for(model, "The cache keeps", 24, ["concat", ("sliding", 8)])  # measure
    plot_cache_state(runs, "sliding (window 8)", step=12)
    plot_latency(measure_latency(model, prompt, 100, [None, "concat"]))              # measure
    plot_memory("llama-3-8b", context=32768)
    plot_rope_rotation(rope_rotation(positions=range(8), model="llama-3-8b"), pairs=(0, 8, 63))

| module | what |
|---|---|
| ``cache_state.py`` | ``plot_cache_state``, ``cache_state_pngs``: one layer's cache, step by step |
| ``latency.py`` | ``plot_latency``: milliseconds per step (``LatencyRun``s) |
| ``memory.py`` | ``plot_memory``, ``plot_cache_sizes``, ``plot_layouts``: bytes, per layout |
| ``rope.py`` | ``plot_rope_rotation``: one key rotated by RoPE, pair by pair (a ``RopeRotation``) |
| ``training.py`` | ``plot_training``: the trained models' loss curves, from their metrics |
| ``streaming.py`` | ``plot_stream_loss``, ``plot_stream_state``, ``plot_first_token_attention`` |
| ``serving.py`` | ``plot_padded_batch``, ``plot_engine_step``, ``plot_serving_memory`` |
| ``compress.py`` | ``plot_channel_magnitudes``, ``plot_frontier``, ``plot_compression`` |
| ``figure.py`` | ``PlotFigure``, ``figure_png``: figures as PNGs |
"""

from ..style import COLORS, NO_CACHE, strategy_color, strategy_label
from .cache_state import CACHE_FIGSIZE, cache_state_pngs, plot_cache_state, token_text
from .compress import FAMILY_STYLE, plot_channel_magnitudes, plot_compression, plot_frontier
from .figure import PlotFigure, figure_png
from .latency import plot_latency
from .memory import plot_cache_sizes, plot_layouts, plot_memory
from .rope import plot_rope_rotation
from .serving import (
    engine_step_pngs,
    padded_batch_slots,
    plot_engine_step,
    plot_padded_batch,
    plot_serving_memory,
    serving_memory,
)
from .streaming import (
    plot_first_token_attention,
    plot_stream_loss,
    plot_stream_state,
    stream_state_pngs,
)
from .training import plot_training

__all__ = [
    "CACHE_FIGSIZE", "COLORS", "FAMILY_STYLE", "NO_CACHE", "PlotFigure", "cache_state_pngs",
    "engine_step_pngs", "figure_png", "padded_batch_slots", "plot_cache_sizes",
    "plot_cache_state", "plot_channel_magnitudes", "plot_compression", "plot_engine_step",
    "plot_first_token_attention", "plot_frontier", "plot_layouts", "plot_latency", "plot_memory",
    "plot_padded_batch", "plot_rope_rotation", "plot_serving_memory", "plot_stream_loss",
    "plot_stream_state", "plot_training", "serving_memory", "stream_state_pngs",
    "strategy_color", "strategy_label", "token_text",
]
