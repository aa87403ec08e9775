"""An opt-in compiled decode step: ``kvlib.generate(model, ids, n, cache="prealloc",
compile=True)``.

A small model's decode step is mostly the fixed cost of many small operations (Python, the
dispatcher, one kernel launch each: ``kvlib.bench.profiling.profile_decode_step``), not the
arithmetic. ``torch.compile`` traces the forward once and fuses those operations into a few
generated kernels. Two settings make one graph serve every step: ``dynamic=True`` (the number
of cached tokens, hence the attention's shapes, changes at every step) and dynamo's
``allow_unspec_int_on_nn_module`` (the caches' counters are plain ints on modules, which dynamo
would otherwise bake into the graph as constants and recompile for at every step).

Compiling costs tens of seconds the first time; it pays where a step is overhead-bound (the
trained minis) and not where it is weight-bound (GPT-2 124M reads 0.5 GB of weights a step
either way): ``python -m kvlib.bench compile`` measures both, and the compile time.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .caches import STRATEGIES, strategy
from .models import CausalLM

_COMPILED: weakref.WeakKeyDictionary[CausalLM, nn.Module] = weakref.WeakKeyDictionary()


def compiled(model: CausalLM) -> nn.Module:
    """``torch.compile(model, dynamic=True)``, made once per model and kept while the model
    lives; it reads and writes the model's own weights and caches (attributes go through to
    ``model``). Call it inside ``compiling()``."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"compile=True takes a kvlib model, got {type(model).__name__}")
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=True)
    return _COMPILED[model]


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """The settings under which ``compiled`` models trace: the caches' int counters stay
    symbolic instead of being baked into the graph, and inductor writes the code that calls
    its kernels in C++ (``cpp_wrapper``) rather than Python, which takes a few microseconds
    off every one of a decode step's calls (and adds seconds to the compilation)."""
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True,
                                    force_nn_module_property_static_shapes=False), \
            torch._inductor.config.patch(cpp_wrapper=True):
        yield


def check_compilable(cache: str | None, draft: object, num_beams: int) -> None:
    """A clear error for what ``compile=True`` does not compile: caches whose buffers change
    shape or layout from step to step (they would recompile; ``Traits.compiles``), drafts and
    beams."""
    if num_beams != 1 or draft is not None:
        raise ValueError("compile=True runs plain decoding: drop draft and num_beams, or "
                         "compile=False")
    if cache is None or cache not in STRATEGIES or not strategy(cache).traits.compiles:
        fixed = [n for n, c in STRATEGIES.items() if c.traits.compiles]
        raise ValueError(f"compile=True compiles caches whose buffers keep their shape from "
                         f"step to step, {fixed}, not cache={cache!r} (it would recompile): use "
                         f"one of those or compile=False")


@contextlib.contextmanager
def compiled_decoding(model: CausalLM, cache: str | None, draft: object = None,
                      num_beams: int = 1) -> Iterator[nn.Module]:
    """``with compiled_decoding(model, "prealloc") as fast: ...``: the checks, the settings and
    the compiled model that ``generate(..., compile=True)`` decodes with (the benchmarks too)."""
    check_compilable(cache, draft, num_beams)
    with compiling():
        yield compiled(model)
