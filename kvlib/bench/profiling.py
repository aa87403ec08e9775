"""What torch.profiler sees: allocations per decode step, and the ops of a decode step.

The profiler's native code writes its own chatter to the process's stderr (``USDT ...
profiler_start`` lines, "Memory block of unknown size" warnings); ``quiet_profiler`` keeps that
out of the terminal and passes on anything else.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..generate import decode_one, prefill
from ..models import CausalLM
from ..timing import Stopwatch
from .plan import PROMPT

PROFILER_NOISE = ("USDT:", "profiler_start", "profiler_stop", "Memory block of unknown size")


@contextmanager
def quiet_profiler(noise: tuple[str, ...] = PROFILER_NOISE) -> Iterator[None]:
    """Point the C-level stderr (file descriptor 2) at a temporary file for the block, then
    write on to the real stderr every line that holds none of ``noise``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not any(n in line for n in noise))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def alloc_steps(n: int, k: int = 3) -> list[int]:
    """Where ``count_allocations`` looks in an ``n``-token run: ``k`` steps from near the middle
    and ``k`` steps at the end, apart (one window for a short run, none for a very short one)."""
    first, last = max(1, n // 2 - k), n - k - 1
    return [first, last] if last >= first + k else [first] if first + k <= n - 1 else []


def _allocated_sizes(prof) -> list[int]:
    """Sizes of the allocator calls in a profile ("[memory]" events; frees are negative)."""
    return [e.nbytes() for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.nbytes() > 0]


def count_allocations(runner, idx: Tensor, at_steps: list[int], k: int = 3) -> list[dict]:
    """Allocations per decode step: torch.profiler records every allocator call ("[memory]"
    events with their sizes); we profile ``k`` consecutive decode steps starting at each step in
    ``at_steps`` (1 = the first decode step; the loop's own work between steps included) and
    divide by ``k``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if idx.is_cuda else [])
    out, taken = [], 0  # items taken from the stream; item 0 is the prefill, item i step i
    stream = runner.stream(idx, max(at_steps) + k)
    for start in sorted(at_steps):
        for _ in range(start - taken):
            next(stream)
        with quiet_profiler(), profile(activities=activities, profile_memory=True) as prof:
            for _ in range(k):
                next(stream)
        taken = start + k
        sizes = _allocated_sizes(prof)
        out.append({"step": start, "seq_len": idx.shape[1] + start,  # keys attended at start
                    "count": len(sizes) / k, "bytes": sum(sizes) / k})
    for _ in stream:  # finish the generation
        pass
    return out


def profile_decode_step(model: CausalLM, n: int = 5, top: int = 8) -> dict:
    """torch.profiler over ``n`` prealloc decode steps: wall time and the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    p = next(model.parameters())
    idx = torch.tensor([PROMPT], device=p.device)
    model.set_kv_cache("prealloc", max_len=64)
    with torch.inference_mode():
        prefill(model, idx)
        seq = torch.cat([idx, idx[:, :1]], dim=1)
        decode_one(model, seq)
        with quiet_profiler(), profile(activities=[ProfilerActivity.CPU]) as prof, \
                Stopwatch(p.device) as wall:
            for _ in range(n):
                decode_one(model, seq)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_self = sum(e.self_cpu_time_total for e in rows) / n / 1e3
    return {"steps": n, "wall_ms": wall.seconds / n * 1e3, "ops_self_ms": total_self,
            "top": [{"op": e.key, "calls": e.count // n,
                     "self_ms": e.self_cpu_time_total / n / 1e3} for e in rows[:top]]}
