"""Pictures of the cache at work: plain functions that return a matplotlib ``Figure``.

Each picture has two halves: a function that measures (runs the real model and reads the real
caches) and returns plain data, and a function that draws that data. ``kvlib.widgets`` puts
controls on top of the same functions. Figures are ``PlotFigure``s (a ``matplotlib.figure.Figure``
that shows itself as a PNG), not pyplot figures, so nothing is kept in global state and a notebook
shows each figure exactly once: as the value of the cell's last line. The measuring functions
hand the reader's model back as they found it (``kvlib.state.preserved_state``).

    runs = cache_frames_for(model, "The cache keeps", 24, ["concat", ("sliding", 8)])
    plot_cache_state(runs, "sliding (window 8)", step=12)
    plot_latency(measure_latency(model, prompt, 100, [None, "concat"]))
    plot_memory("llama-3-8b", context=32768)
    plot_rope_rotation("llama-3-8b", pairs=(0, 8, 16, 63), positions=range(8))

| module | what |
|---|---|
| ``frames.py`` | ``cache_frames``: one layer's cache after every step, read from the real cache |
| ``cache_state.py`` | ``plot_cache_state``, ``cache_state_pngs``: draw those frames |
| ``latency.py`` | ``measure_latency``, ``plot_latency``: milliseconds per step |
| ``memory.py`` | ``plot_memory``, ``plot_cache_sizes``: cache bytes beside the weights |
| ``rope.py`` | ``rope_rotation``, ``plot_rope_rotation``: one key rotated by RoPE, pair by pair |
| ``training.py`` | ``plot_training``: the trained models' loss curves, from their metrics |
| ``streaming.py`` | ``plot_stream_loss``, ``plot_stream_state``, ``plot_first_token_attention`` |
| ``serving.py`` | ``plot_padded_batch``, ``plot_engine_step``, ``plot_serving_memory`` |
| ``compress.py`` | ``plot_channel_magnitudes``, ``measure_frontier``, ``plot_frontier``, ... |
| ``figure.py`` | ``PlotFigure``, ``figure_png``: figures as PNGs |
| ``inputs.py`` | prompts and strategy specs as the measuring functions take them |
"""

from ..style import COLORS, NO_CACHE, strategy_color, strategy_label
from .cache_state import CACHE_FIGSIZE, cache_state_pngs, plot_cache_state, token_text
from .compress import (
    FrontierPoint,
    Tradeoff,
    cached_keys_values,
    compression_tradeoff,
    grouping_errors,
    measure_frontier,
    plot_channel_magnitudes,
    plot_compression,
    plot_frontier,
)
from .figure import PlotFigure, figure_png
from .frames import CacheFrame, cache_frames, cache_frames_for
from .inputs import Prompt, StrategySpec, prompt_ids, spec_label, split_spec
from .latency import LatencyRun, measure_latency, plot_latency
from .memory import plot_cache_sizes, plot_memory
from .rope import RopeRotation, plot_rope_rotation, rope_rotation
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
    "CACHE_FIGSIZE", "COLORS", "NO_CACHE", "CacheFrame", "FrontierPoint", "Tradeoff",
    "cached_keys_values", "compression_tradeoff", "grouping_errors", "measure_frontier",
    "plot_channel_magnitudes", "plot_compression", "plot_frontier", "LatencyRun", "PlotFigure",
    "Prompt",
    "StrategySpec", "cache_frames", "cache_frames_for", "cache_state_pngs", "figure_png",
    "RopeRotation", "measure_latency", "plot_cache_sizes", "plot_cache_state", "plot_latency",
    "plot_first_token_attention", "plot_memory", "plot_rope_rotation", "plot_stream_loss",
    "plot_stream_state", "plot_training", "stream_state_pngs", "prompt_ids", "rope_rotation",
    "spec_label", "split_spec", "strategy_color", "strategy_label", "token_text",
    "engine_step_pngs", "padded_batch_slots", "plot_engine_step", "plot_padded_batch",
    "plot_serving_memory", "serving_memory",
]
