"""kvlib, transformers' DynamicCache and the floor taking turns, one decode step each, so that a
shared machine's drift hits all three alike; with ``compile=True`` kvlib's compiled decoding
(``generate(..., compile=True)``) takes a turn too, and with ``aot=True`` the AOTInductor-compiled
step (``kvlib.aot.AotDecoder``)."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..aot import AotDecoder
from ..loading import load_model
from ..machine import environment_info
from ..measure.floor import Floor
from ..measure.stats import summary
from ..timing import Stopwatch, tokens_per_s
from .plan import PROMPT, SCHEMA
from .runners import HFRunner, KvlibRunner, hf_twin, weight_sharing_copy

TURNS = ("kvlib", "hf", "floor")  # who takes a step, in the first repeat's order
COMPILED = "compiled"  # the fourth, with compile=True
AOT = "aot"  # and with aot=True, kvlib.aot's ahead-of-time compiled step


def lockstep(preset: str = "gpt2", new_tokens: tuple[int, ...] = (200, 1000), repeats: int = 3,
             strategy: str = "prealloc", progress: bool = True, compile: bool = False,
             aot: bool = False) -> dict:
    """kvlib, transformers' DynamicCache and the floor take turns, one decode step each.

    Separate runs, even interleaved, see a shared machine at different moments, and its speed
    drifts. In lockstep the three advance together: step i of each runs right after the others',
    at the same sequence length, so a slowdown hits all three alike. The order of the three
    rotates with the repeat. Flatness is also given per floor: each step divided by the floor step
    timed next to it, which cancels the drift left between the first and last 100 steps.

    ``compile``: kvlib's compiled decoding takes a turn too; the warm-up compiles it, and its
    first two steps (the prefill's graph and the decode step's, compilation included) are
    recorded as ``compile_s``. ``aot``: so does ``AotDecoder``'s step (the Llama family or GPT-2),
    made before the turns; what making it took is ``aot_compile_s``."""
    from tqdm.auto import tqdm

    model = load_model(preset, seed=123, dtype=torch.float32, device="cpu")
    out = {"schema": SCHEMA + "/lockstep", "model": preset, "strategy": strategy,
           "compiled": compile, "aot": aot,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "environment": environment_info("cpu"), "runs": []}
    turns = Turns(model, strategy, compile, len(PROMPT) + max(new_tokens) if aot else 0)
    if aot:
        out["aot_compile_s"] = round(turns.decoder.compile_s, 4)
    with Stopwatch("cpu") as clock, tqdm(total=len(new_tokens) * (repeats + 1), desc="lockstep",
                                          unit="run", disable=not progress) as bar:
        for n in new_tokens:
            reps = []
            for r in range(-1, repeats):  # r = -1: an untimed warm-up (at most 64 tokens)
                # compiled: the warm-up has the buffers' size too, or a repeat would recompile
                rep = turns.run(min(n, 64) if r < 0 and not compile else n, r)
                bar.update(1)
                if r >= 0:
                    reps.append(rep)
                elif compile and "compile_s" not in out:  # the first warm-up compiled it
                    out["compile_s"] = round(turns.first_compiled_s, 4)
            out["runs"].append({"new_tokens": n, "repeats": reps, **lockstep_summary(reps)})
    out["duration_s"] = clock.seconds
    return out


class Turns:
    """One model's three contestants: kvlib's loop, its transformers twin's, and its floor."""

    def __init__(self, model, strategy: str, compile: bool = False, aot_max_len: int = 0
                 ) -> None:
        self.model, self.strategy, self.hf = model, strategy, hf_twin(model)
        self.idx = torch.tensor([PROMPT])
        self.floor = Floor(model, 1)
        self.turns = TURNS + ((COMPILED,) if compile else ()) + ((AOT,) if aot_max_len else ())
        # the compiled loops each on a copy: the kvlib loops would clobber one set of caches
        self.twin = weight_sharing_copy(model) if compile else None
        self.decoder = None  # aot_max_len: AotDecoder's step for texts of that many tokens
        if aot_max_len:
            self.decoder = AotDecoder(weight_sharing_copy(model), aot_max_len)
        self.first_compiled_s = 0.0  # the prefill and first step of the last compiled stream

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
        if COMPILED in self.turns:
            streams[COMPILED] = KvlibRunner(self.twin, self.strategy, 128,
                                            compile=True).stream(self.idx, n)
        if AOT in self.turns:
            streams[AOT] = self.decoder.stream(self.idx, n)
        k = repeat % len(self.turns)
        order = list(self.turns[k:] + self.turns[:k])
        times: dict[str, list[float]] = {who: [] for who in self.turns}
        tokens: dict[str, list[Tensor]] = {who: [] for who in self.turns if who != "floor"}
        for _ in range(n):
            for who in order:
                tok, seconds = next(streams[who])
                times[who].append(seconds)
                if tok is not None:
                    tokens[who].append(tok)
        for stream in streams.values():
            stream.close()  # a compiled stream leaves its dynamo settings here
        if COMPILED in times:
            self.first_compiled_s = sum(times[COMPILED][:2])
        same = all(torch.equal(a, b) for who in tokens if who != "kvlib"
                   for a, b in zip(tokens["kvlib"], tokens[who], strict=True))
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

    extra = {}  # the compiled loops that ran, judged as kvlib's
    for who in (w for w in (COMPILED, AOT) if f"{w}_ms" in reps[0]):
        extra[f"{who}_over_hf_tokens_per_s"] = per(
            lambda r, w=who: tokens_per_s(r[f"{w}_ms"]) / tokens_per_s(r["hf_ms"]))
        extra[f"{who}_over_floor"] = per(
            lambda r, w=who: med(r, f"{w}_ms") / med(r, "floor_ms"))
    return {
        **extra,
        "kvlib_over_hf_tokens_per_s": per(
            lambda r: tokens_per_s(r["kvlib_ms"]) / tokens_per_s(r["hf_ms"])),
        "step_over_floor": per(lambda r: med(r, "kvlib_ms") / med(r, "floor_ms")),
        "hf_over_floor": per(lambda r: med(r, "hf_ms") / med(r, "floor_ms")),
        "flatness": per(lambda r: flat(r["kvlib_ms"])),
        "flatness_per_floor": per(lambda r: flat(
            [a / b for a, b in zip(r["kvlib_ms"], r["floor_ms"], strict=True)])),
        "same_tokens": all(r["same_tokens"] for r in reps),
    }


def lockstep_text(d: dict) -> list[str]:
    """The lockstep section: one row per new-token count, and the compiled loop's when it ran."""
    threads = d["environment"]["threads"]
    extra = [w for w in (COMPILED, AOT) if d.get(w)]  # the compiled loops that took turns
    lines = [
        f"## Lockstep: {d['model']}, {threads} thread(s): kvlib, DynamicCache and the floor in "
        "turn\n",
        f"`python -m kvlib.bench lockstep` ({d['created']}, {d['duration_s'] / 60:.1f} min, "
        f"{threads} threads, {d['environment']['cpu_model']}): {d['model']}, float32, batch 1, "
        f"`{d['strategy']}` against transformers' `DynamicCache` and the floor, one decode step "
        "of each in turn, so that drift hits them all alike; medians over the repeats (min-max "
        "in brackets). These are the same targets, measured a second, better-controlled way.\n"]
    if COMPILED in extra:
        lines.append(
            "`compiled` is kvlib's loop through `generate(..., compile=True)` (a copy of the model "
            "with its own caches and the same weight tensors), taking its turn as a fourth. Its "
            "first two steps in the "
            f"warm-up, the prefill and the first decode step with their compilation, took "
            f"{d['compile_s']:.1f} s.\n")
    if AOT in extra:
        lines.append(
            "`aot` is `kvlib.aot.AotDecoder`'s loop (a copy of the model, the same weights): the "
            "decode step exported once and compiled by AOTInductor, called with no dynamo in "
            f"between, over a static cache; making it took {d['aot_compile_s']:.1f} s, before "
            "the turns.\n")
    head = ["new tokens", "repeats", "kvlib / DynamicCache tok/s", "step / floor",
            "DynamicCache step / floor", "last 100 / first 100", "same, per floor step"]
    for w in extra:
        head += [f"{w} / DynamicCache tok/s", f"{w} step / floor"]
    head += [", ".join(["kvlib", "HF", "floor", *extra]) + " step ms", "same tokens"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(x: dict) -> str:
        return f"{x['median']:.3f} ({x['min']:.3f}-{x['max']:.3f})"

    for r in d["runs"]:
        keys = ["kvlib_over_hf_tokens_per_s", "step_over_floor", "hf_over_floor", "flatness",
                "flatness_per_floor"]
        for w in extra:
            keys += [f"{w}_over_hf_tokens_per_s", f"{w}_over_floor"]
        who = ["kvlib", "hf", "floor", *extra]
        ms = ", ".join(f"{median_of(r['repeats'], w + '_ms'):.3f}" for w in who)
        lines.append(f"| {r['new_tokens']} | {len(r['repeats'])} | "
                     + " | ".join(cell(r[k]) for k in keys)
                     + f" | {ms} | {'yes' if r['same_tokens'] else 'NO'} |")
    return lines + [""]


def median_of(repeats: list[dict], key: str) -> float:
    """The median over the repeats of each repeat's median step (ms)."""
    return float(np.median([np.median(rep[key]) for rep in repeats]))
