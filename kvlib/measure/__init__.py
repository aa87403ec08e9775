"""Measuring: everything that runs a model to get a number.

``kvlib.bench`` runs plans of these functions and writes the reports, and the chapters call them
directly. Every timing goes through ``kvlib.timing.Stopwatch``; every function that borrows a
reader's model hands it back as it found it (``kvlib.state.preserved_state``).

    time_decode(model, ids, first=ids.shape[1] - 32, cache="prealloc", repeats=3).median_ms
    step_ms(model, ids, {"cache": "quantized", "bits": 4}, steps=32, repeats=3)   # the same

| module | what |
|---|---|
| ``steps.py`` | the timed decode loop, once: ``time_decode``, ``DecodeTimes``, ``step_ms`` |
| ``stats.py`` | ``median``, ``median_ms``, ``summary``, ``percentiles``: every median reported |
"""

from .stats import NAN, median, median_ms, percentiles, summary
from .steps import DecodeTimes, step_ms, time_decode

__all__ = ["NAN", "DecodeTimes", "median", "median_ms", "percentiles", "step_ms", "summary",
           "time_decode"]
