"""Measuring: everything that runs a model to get a number or the data of a picture.

``kvlib.plots`` draws what these functions return, ``kvlib.widgets`` calls them and then a plot
function, ``kvlib.bench`` runs plans of them and writes the reports, and the chapters call them
directly. Every timing goes through ``kvlib.timing.Stopwatch``; every function that borrows a
reader's model hands it back as it found it (``kvlib.state.preserved_state``).

    time_decode(model, ids, first=ids.shape[1] - 32, cache="prealloc", repeats=3).median_ms
    step_ms(model, ids, CONFIGS["int4"], steps=32, repeats=3)        # the same, by options
    runs = cache_frames_for(model, "The cache keeps", 24, ["concat", ("sliding", 8)])
    runs = measure_latency(model, "The cache keeps", 100, [None, "concat"])
    points = measure_frontier(model, rows, CONFIGS)

| module | what |
|---|---|
| ``steps.py`` | the timed decode loop, once: ``time_decode``, ``DecodeTimes``, ``step_ms`` |
| ``stats.py`` | ``median``, ``median_ms``, ``summary``, ``percentiles``: every median reported |
| ``inputs.py`` | prompts and strategy specs as the measuring functions take them |
| ``frames.py`` | ``cache_frames``, ``cache_frames_for``: one layer's cache after every step |
| ``latency.py`` | ``measure_latency``, ``LatencyRun``: every generation step timed |
| ``rope.py`` | ``rope_rotation``, ``RopeRotation``: one key rotated by a model's RoPE |
| ``compress.py`` | ``CONFIGS``, ``measure_frontier``, ``compression_tradeoff``, ``bytes_after`` |
| ``latent.py`` | ``attention_modes``: latent attention decoded naive and absorbed, timed in turn |
| ``floor.py`` | ``Floor``: the weight-streaming floor (every weight matrix read once); and
  ``step_against_floor``: a decode step and the floor in turn |
"""

from .compress import (
    CONFIGS,
    RESIDUAL,
    FrontierPoint,
    Tradeoff,
    attention_inputs,
    attention_output_errors,
    bytes_after,
    cached_keys_values,
    compression_tradeoff,
    grouping_errors,
    measure_frontier,
)
from .floor import Floor, step_against_floor
from .frames import CacheFrame, cache_frames, cache_frames_for
from .inputs import Prompt, StrategySpec, prompt_ids, spec_label, split_spec
from .latency import LatencyRun, measure_latency
from .latent import attention_modes
from .rope import RopeRotation, rope_config, rope_rotation
from .stats import NAN, median, median_ms, percentiles, summary
from .steps import DecodeTimes, step_ms, time_decode

__all__ = [
    "CONFIGS", "NAN", "RESIDUAL", "CacheFrame", "DecodeTimes", "FrontierPoint", "LatencyRun",
    "Prompt", "RopeRotation", "StrategySpec", "Tradeoff", "bytes_after", "cache_frames",
    "cache_frames_for", "cached_keys_values", "compression_tradeoff", "grouping_errors",
    "measure_frontier", "measure_latency", "median", "median_ms", "percentiles", "prompt_ids",
    "rope_config", "rope_rotation", "spec_label", "split_spec", "step_ms", "summary",
    "time_decode", "attention_modes", "attention_inputs", "attention_output_errors", "Floor",
    "step_against_floor",
]
