"""The issue's targets (gpt2, float32, batch 1, CPU), judged from a run's numbers and, again, from
a lockstep run: each met, not met, or not measured (never a pass). Their limits live in one table,
``TARGETS``, that both judges read."""

from __future__ import annotations

from dataclasses import dataclass

from ..style import NO_CACHE
from .plan import PROMPT

BASE = {"model": "gpt2", "dtype": "float32", "batch": 1, "device": "cpu"}  # the targets' cells


@dataclass(frozen=True)
class Target:
    new_tokens: int  # the run length it is judged at
    op: str  # ">=" or "<="
    limit: float


TARGETS: dict[str, Target] = {
    # kvlib's decode tokens/s over transformers' DynamicCache's
    "faster_than_hf_200": Target(200, ">=", 1.2),
    "faster_than_hf_1000": Target(1000, ">=", 1.3),
    # the median decode step over the floor
    "near_floor_200": Target(200, "<=", 1.15),
    # the last 20 steps of a long run over the floor + KV read at that length
    "near_floor_kv_end_1000": Target(1000, "<=", 1.2),
    # the median of the last 100 steps over the first 100 (lockstep: each step per floor step)
    "flat_1000": Target(1000, "<=", 1.25),
}


def find(results: list[dict], **kw) -> dict | None:
    return next((r for r in results if all(r.get(k) == v for k, v in kw.items())), None)


def target_row(key: str, name: str, value: float | None, detail: str = "") -> dict:
    """Target ``key`` of ``TARGETS``: met (True/False), or None when the value was not measured
    (never a pass)."""
    t = TARGETS[key]
    ok = None if value is None or value != value else (
        value >= t.limit if t.op == ">=" else value <= t.limit)
    return {"target": name, "value": value, "op": t.op, "limit": t.limit, "met": ok,
            "detail": detail}


def shown_row(name: str, value: float | None) -> dict:
    """A number shown beside the targets, with no limit to meet."""
    return {"target": name, "value": value, "op": "shown", "limit": None,
            "met": None if value is None else True, "detail": ""}


def _ratio(a: dict | None, b: dict | None, key: str = "decode_tokens_per_s") -> float | None:
    return a[key]["median"] / b[key]["median"] if a and b else None


def targets(data: dict) -> list[dict]:
    """The issue's targets (gpt2, float32, batch 1, CPU), each met, not met or not measured."""
    res = data["results"]
    out = targets_200(res) + targets_1000(res)
    out += shown_rows(res, best_at_200(res))
    threads = data["environment"]["threads"]
    if threads != 2:
        for t in out:
            t["detail"] = (t["detail"] + f"; measured with {threads} threads, the targets "
                           "assume 2").lstrip("; ")
    return out


def best_at_200(res: list[dict]) -> dict | None:
    """kvlib's fastest cache at 200 tokens among those that give HF's tokens (sliding attends to
    fewer: not compared)."""
    mine = [r for r in res if r["strategy"] in ("concat", "prealloc") and r["new_tokens"] == 200
            and all(r[k] == v for k, v in BASE.items())]
    return max(mine, key=lambda r: r["decode_tokens_per_s"]["median"], default=None)


def targets_200(res: list[dict]) -> list[dict]:
    best, hf = best_at_200(res), find(res, strategy="hf-dynamic", new_tokens=200, **BASE)
    name = best["strategy"] if best else ""
    return [target_row("faster_than_hf_200", "200 tokens: fastest kvlib cache / HF "
                       "DynamicCache, decode tokens/s", _ratio(best, hf), name if hf else ""),
            target_row("near_floor_200", "200 tokens: fastest kvlib cache's median decode step "
                       "/ floor", best["floor_ratio"] if best else None, name)]


def targets_1000(res: list[dict]) -> list[dict]:
    pre = find(res, strategy="prealloc", new_tokens=1000, **BASE)
    hf = find(res, strategy="hf-dynamic", new_tokens=1000, **BASE)
    return [target_row("faster_than_hf_1000", "1000 tokens: prealloc / HF DynamicCache, decode "
                       "tokens/s", _ratio(pre, hf)),
            target_row("near_floor_kv_end_1000", "1000 tokens: prealloc step at the end (last 20 "
                       f"steps) / (floor + KV read at {len(PROMPT) + 1000})",
                       pre["end_floor_kv_ratio"] if pre else None),
            target_row("flat_1000", "1000 tokens: prealloc median step, last 100 / first 100",
                       pre["last_ms"] / pre["first_ms"] if pre else None)]


def shown_rows(res: list[dict], best: dict | None) -> list[dict]:
    cat = find(res, strategy="concat", new_tokens=1000, **BASE)
    out = [shown_row("1000 tokens: concat median step, last 100 / first 100 (shown)",
                     cat["last_ms"] / cat["first_ms"] if cat else None)]
    none = find(res, strategy="none", new_tokens=200, **BASE)
    if none and best:
        pre200 = find(res, strategy="prealloc", new_tokens=200, **BASE) or best
        out.append(shown_row(f"200 tokens end to end: {NO_CACHE} / prealloc, wall time (expect "
                             "~3.5-4x)", _ratio(none, pre200, "wall_s")))
    return out


LOCKSTEP = [  # (target, what the lockstep run measured of it, how the report names it)
    ("faster_than_hf_200", "kvlib_over_hf_tokens_per_s", "{s} / HF DynamicCache, decode tokens/s"),
    ("near_floor_200", "step_over_floor", "{s} median decode step / floor"),
    ("faster_than_hf_1000", "kvlib_over_hf_tokens_per_s",
     "{s} / HF DynamicCache, decode tokens/s"),
    ("flat_1000", "flatness_per_floor", "{s} median step, last 100 / first 100, each step divided "
     "by the floor step beside it"),
]


def lockstep_targets(d: dict) -> list[dict]:
    """The ratio targets again, from a lockstep run: same rows as ``targets``, marked lockstep."""
    runs = {r["new_tokens"]: r for r in d["runs"]}
    out = []
    for key, measured, name in LOCKSTEP:
        n = TARGETS[key].new_tokens
        value = runs[n][measured]["median"] if n in runs else None
        out.append(target_row(key, f"{n} tokens, lockstep: " + name.format(s=d["strategy"]),
                              value))
    return out
