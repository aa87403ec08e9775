"""The one way kvlib times anything: wait for the device, then read a monotonic clock.

On a GPU, work is queued and a clock read right after a call measures only the launch, so every
timing site calls ``device_sync`` first (``Stopwatch`` does it on both ends).
"""

from __future__ import annotations

import time

import torch


def device_sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer measures the work and not just its launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Stopwatch:
    """``with Stopwatch(device) as sw: ...`` then ``sw.seconds``: synced on entry and exit."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds = float("nan")

    def __enter__(self) -> Stopwatch:
        device_sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        device_sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def tokens_per_s(step_seconds: list[float]) -> float:
    """Tokens per second over decode steps of one token each (NaN when there are none)."""
    total = sum(step_seconds)
    return len(step_seconds) / total if step_seconds and total > 0 else float("nan")
