"""Chapter 6's grader: ``check_payback``, a reader's payback of a compile time, against
``kvlib.compiling.payback_steps`` (which the benchmark report uses), with hints."""

from __future__ import annotations

import math
from collections.abc import Callable

from .check import CacheCheckError
from .compiling import payback_steps

CASES = [(24.0, 2.0, 1.2), (23.0, 37.7, 36.3), (0.5, 10.0, 2.0), (24.0, 2.0, 2.0),
         (24.0, 2.0, 2.4)]  # (first_run_s, eager_ms, compiled_ms): pays, pays, pays, never, never


def check_payback(fn: Callable[[float, float, float], float], verbose: bool = True) -> str:
    """Grade a reader's ``fn(first_run_s, eager_ms, compiled_ms)``: the decode steps after which
    compiling has paid for itself, as ``payback_steps`` gives them (``math.inf`` when the
    compiled step saves nothing). Raises ``CacheCheckError`` with a hint."""
    for case in CASES:
        want = payback_steps(*case)
        try:
            got = fn(*case)
        except ZeroDivisionError:
            raise CacheCheckError(f"payback{case} divided by zero: when the compiled step saves "
                                  "nothing (eager_ms - compiled_ms <= 0) it never pays back; "
                                  "return math.inf") from None
        number = isinstance(got, (int, float))
        close = number and (got == want if math.isinf(want) else abs(got - want) <= 1e-6 * want)
        if not close:
            if math.isinf(want):
                hint = ("a compiled step that is no faster never pays back: return math.inf "
                        "when eager_ms - compiled_ms <= 0")
            elif number and abs(1e3 * got - want) <= 1e-6 * want:
                hint = "first_run_s is in seconds and the steps in milliseconds: times 1000"
            else:
                hint = ("the compile time over what each step saves: "
                        "first_run_s / (eager - compiled)")
            raise CacheCheckError(f"payback{case} gave {got!r}, want {want:,.1f} decode steps: "
                                  f"{hint}")
    detail = (f"{len(CASES)} cases: it pays back after first_run_s / (eager - compiled) steps, "
              "and never when the compiled step is no faster")
    if verbose:
        print(f"ok  payback: {detail}")
    return detail
