"""The timed decode loop, written once: prefill, then time every decode step.

``time_decode(model, ids, first, cache, ...)`` gives the model a fresh cache, prefills the first
``first`` tokens of ``ids`` ``(B, T)`` (untimed), then feeds the rest one token per step as
``generate`` does (``decode_one`` over ``ids[:, :t + 1]``: teacher forced, so every strategy
decodes the same text), each step inside a ``kvlib.timing.Stopwatch``. ``warmup`` passes run first
and are dropped; ``repeats`` passes are kept. The model is handed back as it was
(``kvlib.state.preserved_state``): its own caches, position, training flags, dtype and device.

    times = time_decode(model, ids, first=ids.shape[1] - 32, cache="prealloc", repeats=3)
    times.median_ms                   # the median step over every kept pass
    step_ms(model, ids, {"cache": "quantized", "bits": 4}, steps=32, repeats=3)   # the same
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..compiling import decoding
from ..generate import decode_one, prefill
from ..models import CausalLM
from ..state import model_device, preserved_state
from ..timing import Stopwatch
from .stats import median_ms


@dataclass
class DecodeTimes:
    """What ``time_decode`` measured: step ``k`` of a pass fed ``ids[:, :first + k + 1]``."""

    first: int  # tokens prefilled before the first timed step
    seconds: list[list[float]] = field(default_factory=list)  # per kept pass, per step
    nbytes: list[int] = field(default_factory=list)  # bytes the caches held after each step

    @property
    def steps(self) -> list[float]:
        """Every kept step's seconds, pass after pass."""
        return [s for one in self.seconds for s in one]

    @property
    def median_ms(self) -> float:
        """The median step over every kept pass, in milliseconds."""
        return median_ms(self.steps)


def _one_pass(model: CausalLM, ids: Tensor, first: int, device: torch.device,
              cache: str, options: dict, compile: bool) -> tuple[list[float], list[int]]:
    """A fresh cache, an untimed prefill of ``first`` tokens, then every later token timed;
    ``compile``: the forwards through the compiled model (``kvlib.compiling``)."""
    model.set_kv_cache(cache, **options)
    with decoding(model, cache, compile) as run:
        prefill(run, ids[:, :first])
        seconds, nbytes = [], []
        for t in range(first, ids.shape[1]):
            with Stopwatch(device) as sw:
                decode_one(run, ids[:, : t + 1])
            seconds.append(sw.seconds)
            nbytes.append(model.kv_cache_nbytes)
    return seconds, nbytes


@torch.inference_mode()
def time_decode(model: CausalLM, ids: Tensor, first: int, cache: str = "concat", *,
                repeats: int = 1, warmup: int = 0, compile: bool = False,
                **options) -> DecodeTimes:
    """Prefill ``ids[:, :first]`` and time the decode step of each later token of ``ids``
    ``(B, T)``, ``repeats`` times after ``warmup`` untimed passes. ``cache`` and ``options``
    (``window=``, ``bits=``, ...) go to ``model.set_kv_cache``; ``max_len`` defaults to ``T``.
    ``compile``: decode as ``generate(..., compile=True)`` does (the first pass compiles: give
    it a warm-up)."""
    T = ids.shape[1]
    if not 1 <= first < T:
        raise ValueError(f"first must leave at least one token to prefill and one to decode: "
                         f"1 <= first < {T}, got {first}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    options = {"max_len": T, **options}
    out = DecodeTimes(first)
    device = model_device(model)
    with preserved_state(model):
        for i in range(warmup + repeats):
            seconds, nbytes = _one_pass(model, ids, first, device, cache, options, compile)
            if i >= warmup:
                out.seconds.append(seconds)
                out.nbytes = nbytes
    return out


def step_ms(model: CausalLM, ids: Tensor, options: Mapping, steps: int, repeats: int = 3,
            warmup: int = 0) -> float:
    """The median decode step (ms) over the last ``steps`` positions of ``ids`` ``(B, T)``:
    prefill the rest, then decode one token at a time, ``repeats`` times. ``options`` are
    ``kvlib.perplexity``'s keywords (``{"cache": "quantized", "bits": 4}``, as in ``CONFIGS``)."""
    opts = dict(options)
    cache = opts.pop("cache", "concat")
    return time_decode(model, ids, ids.shape[1] - steps, cache, repeats=repeats, warmup=warmup,
                       **opts).median_ms
