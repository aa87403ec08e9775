"""kvlib, transformers' DynamicCache and the floor taking turns, one decode step each, so that a
shared machine's drift hits all three alike."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..loading import load_model
from ..machine import environment_info
from ..measure.stats import summary
from ..timing import Stopwatch, tokens_per_s
from .floor import Floor
from .plan import PROMPT, SCHEMA
from .runners import HFRunner, KvlibRunner, hf_twin

TURNS = ("kvlib", "hf", "floor")  # who takes a step, in the first repeat's order


def lockstep(preset: str = "gpt2", new_tokens: tuple[int, ...] = (200, 1000), repeats: int = 3,
             strategy: str = "prealloc", progress: bool = True) -> dict:
    """kvlib, transformers' DynamicCache and the floor take turns, one decode step each.

    Separate runs, even interleaved, see a shared machine at different moments, and its speed
    drifts. In lockstep the three advance together: step i of each runs right after the others',
    at the same sequence length, so a slowdown hits all three alike. The order of the three
    rotates with the repeat. Flatness is also given per floor: each step divided by the floor step
    timed next to it, which cancels the drift left between the first and last 100 steps."""
    from tqdm.auto import tqdm

    model = load_model(preset, seed=123, dtype=torch.float32, device="cpu")
    out = {"schema": SCHEMA + "/lockstep", "model": preset, "strategy": strategy,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "environment": environment_info("cpu"), "runs": []}
    turns = Turns(model, strategy)
    with Stopwatch("cpu") as clock, tqdm(total=len(new_tokens) * (repeats + 1), desc="lockstep",
                                          unit="run", disable=not progress) as bar:
        for n in new_tokens:
            reps = []
            for r in range(-1, repeats):  # r = -1: an untimed warm-up of at most 64 tokens
                rep = turns.run(min(n, 64) if r < 0 else n, r)
                bar.update(1)
                if r >= 0:
                    reps.append(rep)
            out["runs"].append({"new_tokens": n, "repeats": reps, **lockstep_summary(reps)})
    out["duration_s"] = clock.seconds
    return out


class Turns:
    """One model's three contestants: kvlib's loop, its transformers twin's, and its floor."""

    def __init__(self, model, strategy: str) -> None:
        self.model, self.strategy, self.hf = model, strategy, hf_twin(model)
        self.idx = torch.tensor([PROMPT])
        self.floor = Floor(model, 1)

    def floor_stream(self) -> Iterator[tuple[None, float]]:
        while True:
            yield None, self.floor.step_seconds()

    def run(self, n: int, repeat: int) -> dict:
        """``n`` steps of each in turn, in the order of ``repeat`` (rotated by one per repeat):
        the order, whether kvlib and HF chose the same tokens, and each one's step milliseconds
        (the prefill left out)."""
        streams = {"kvlib": KvlibRunner(self.model, self.strategy, 128).stream(self.idx, n),
                   "hf": HFRunner(self.hf, "hf-dynamic").stream(self.idx, n),
                   "floor": self.floor_stream()}
        order = list(TURNS[repeat % 3:] + TURNS[: repeat % 3])
        times: dict[str, list[float]] = {who: [] for who in TURNS}
        tokens: dict[str, list[Tensor]] = {"kvlib": [], "hf": []}
        for _ in range(n):
            for who in order:
                tok, seconds = next(streams[who])
                times[who].append(seconds)
                if tok is not None:
                    tokens[who].append(tok)
        same = all(torch.equal(a, b) for a, b in zip(tokens["kvlib"], tokens["hf"], strict=True))
        return {"order": order, "same_tokens": same,
                **{f"{k}_ms": [round(1e3 * t, 4) for t in v[1:]] for k, v in times.items()}}


def lockstep_summary(reps: list[dict]) -> dict:
    """Per repeat: kvlib / HF decode tokens/s, median step / median floor, and flatness (median
    of the last 100 steps / the first 100) raw and divided step by step by the floor; medians over
    the repeats. The prefill is not in the lists (as in ``run``, only decode steps count)."""
    def per(f: Callable[[dict], float]) -> dict:
        return summary([f(r) for r in reps])

    def med(r: dict, key: str) -> float:
        return float(np.median(r[key]))

    def flat(xs: list[float]) -> float:
        k = min(100, len(xs) // 2)
        return float(np.median(xs[-k:]) / np.median(xs[:k]))

    return {
        "kvlib_over_hf_tokens_per_s": per(
            lambda r: tokens_per_s(r["kvlib_ms"]) / tokens_per_s(r["hf_ms"])),
        "step_over_floor": per(lambda r: med(r, "kvlib_ms") / med(r, "floor_ms")),
        "hf_over_floor": per(lambda r: med(r, "hf_ms") / med(r, "floor_ms")),
        "flatness": per(lambda r: flat(r["kvlib_ms"])),
        "flatness_per_floor": per(lambda r: flat(
            [a / b for a, b in zip(r["kvlib_ms"], r["floor_ms"], strict=True)])),
        "same_tokens": all(r["same_tokens"] for r in reps),
    }
