"""Summaries of a sample of timings: the median with its spread, and latency percentiles.

Every median kvlib reports goes through here (``median``, ``median_ms``), so an empty sample
gives NaN everywhere instead of an error in one place and a NaN in another.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NAN = float("nan")


def summary(xs: Iterable[float]) -> dict[str, float]:
    """Median, quartiles, extremes and count of a sample."""
    a = np.asarray(list(xs), dtype=float)
    if a.size == 0:
        return {"median": NAN, "q1": NAN, "q3": NAN, "min": NAN, "max": NAN, "n": 0}
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(a.min()),
            "max": float(a.max()), "n": int(a.size)}


def percentiles(xs: Iterable[float]) -> dict[str, float]:
    """The 50th, 90th and 99th percentiles of a sample (NaN for none)."""
    a = np.asarray(list(xs), dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99]) if a.size else (NAN,) * 3
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def median(xs: Iterable[float]) -> float:
    """The median of a sample (NaN for none)."""
    a = np.asarray(list(xs), dtype=float)
    return float(np.median(a)) if a.size else NAN


def median_ms(seconds: Iterable[float]) -> float:
    """The median of timings in seconds, in milliseconds (NaN for none)."""
    return median(seconds) * 1e3
