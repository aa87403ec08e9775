"""An opt-in compiled decode step: ``kvlib.generate(model, ids, n, cache="prealloc",
compile=True)``.

A small model's decode step is mostly the fixed cost of many small operations (Python, the
dispatcher, one kernel launch each: ``kvlib.bench.profiling.profile_decode_step``), not the
arithmetic. ``torch.compile`` traces the forward once and fuses those operations into a few
generated kernels. One graph serves every step because the caches' counters (``seen``, the
tokens held, and ``max_len``) and their buffers' token dimension are named symbolic
(``CACHE_COUNTERS``, through ``torch.compiler.config.dynamic_sources``): dynamo would otherwise
bake those ints into the graph as constants and recompile at every step. Every other int on the
model (heads, head size, ...) stays a constant, so dynamo has few guards to check before each
step. Marking every int on every module symbolic instead (``allow_unspec_int_on_nn_module``,
this module's first way) added some 400 guards that reason about ``n_heads`` and
``head_dim``, checked in Python at every step: in one process on the Intel type, one thread,
that made a mini-llama step 1.55x its floor against 1.34x now.

Compiling costs tens of seconds the first time. It pays most where a step is overhead-bound
(the trained minis) and little where it is weight-bound (GPT-2 124M reads 0.5 GB of weights a
step either way): ``python -m kvlib.bench compile`` measures both, and the compile time.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .caches import STRATEGIES, strategy
from .models import CausalLM

# Sources (dynamo's names for what the forward reads) of the ints and dims that change from step
# to step or from call to call: every attention layer's cache counters and its buffers' tokens.
CACHE_COUNTERS = (r".*\['kv_cache'\]\.(seen|max_len),"
                  r".*\['kv_cache'\]\._buffers\['(keys|values)'\]:2")

RECOMPILE_LIMIT = 64  # graphs per function (see compiling())

_COMPILED: weakref.WeakKeyDictionary[CausalLM, nn.Module] = weakref.WeakKeyDictionary()


def compiled(model: CausalLM) -> nn.Module:
    """``torch.compile(model)``, made once per model and kept while the model
    lives; it reads and writes the model's own weights and caches (attributes go through to
    ``model``). Call it inside ``compiling()``."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"compile=True takes a kvlib model, got {type(model).__name__}")
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model)
    return _COMPILED[model]


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """The settings under which ``compiled`` models trace and run.

    - The caches' counters stay symbolic instead of being baked into the graph; any other dim
      that changes between calls (the prompt's length, the batch) turns symbolic at its first
      recompilation.
    - Inductor writes the code that calls its kernels in C++ (``cpp_wrapper``) rather than
      Python: a few microseconds off every one of a decode step's calls, seconds more to
      compile.
    - Dynamo checks its guards on symbolic shapes in C++, and skips the guards of a module whose
      ``__dict__`` has not changed since the last step (``use_recursive_dict_tags_for_guards``):
      the weights' modules, not the caches, whose counters move at every step. That assumes a
      module's tensors are not changed in place behind its back (``param.data = other``);
      loading weights with ``load_state_dict`` copies values and is fine.
    - A function may hold up to ``RECOMPILE_LIMIT`` graphs, not dynamo's default 8, past which
      it runs that function eagerly with one warning: each strategy, each phase of a cache
      (filling, full, past the trained positions) and each model is a graph of its own for the
      same ``forward``, and the streaming benchmark (three strategies in one process) went past
      8, so its prealloc and recompute runs decoded eagerly while they counted as compiled."""
    with torch.compiler.config.patch(dynamic_sources=CACHE_COUNTERS), \
            torch._inductor.config.patch(cpp_wrapper=True), \
            torch._dynamo.config.patch(enable_cpp_symbolic_shape_guards=True,
                                       use_recursive_dict_tags_for_guards=True,
                                       recompile_limit=RECOMPILE_LIMIT):
        yield


def payback_steps(first_run_s: float, eager_ms: float, compiled_ms: float) -> float:
    """Decode steps after which compiling has paid for itself: the seconds of the first
    compiled run (the compilation) over the milliseconds a compiled step saves; ``inf`` when
    the compiled step saves nothing."""
    saved_ms = eager_ms - compiled_ms
    return 1e3 * first_run_s / saved_ms if saved_ms > 0 else float("inf")


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


@contextlib.contextmanager
def decoding(model: CausalLM, cache: str | None, compile: bool) -> Iterator[nn.Module]:
    """The model a decode loop calls: ``model`` itself, or with ``compile`` its compiled twin
    under ``compiled_decoding``'s checks and settings."""
    if not compile:
        yield model
        return
    with compiled_decoding(model, cache) as fast:
        yield fast
