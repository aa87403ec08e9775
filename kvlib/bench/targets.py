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
    # the Qwen3-0.6B shape (28 layers, grouped-query attention), float32: kvlib's fastest cache
    "qwen3_near_floor_200": Target(200, "<=", 1.08),  # median decode step / floor
    "qwen3_faster_than_hf_200": Target(200, ">=", 1.05),  # over transformers' DynamicCache
    # the prealloc decode step in bfloat16 over the same step in float32, per model
    "bf16_step_200": Target(200, "<=", 0.75),
    # attention sinks (python -m kvlib.bench streaming): flat, and against recomputing the window
    "sinks_flat": Target(2048, "<=", 1.1),  # step at the longest length / at 1/8 of it
    "sinks_vs_recompute": Target(2048, ">=", 10.0),  # recompute's time per token / sinks'
    # many requests (python -m kvlib.bench serving), judged on the whole workload
    "engine_vs_hf_padded": Target(0, ">=", 2.0),  # engine tokens/s / transformers' padded batch
    "paged_waste": Target(0, "<=", 5.0),  # % of the paged pool's reserved bytes not used
    "paged_step": Target(0, "<=", 1.15),  # paged decode step / contiguous prealloc, same batch
    # compressed caches (python -m kvlib.bench compress), mini-llama at its full context (256)
    "int8_bytes": Target(256, "<=", 0.28),  # bytes held / fp32's, scales included, no residual
    "int4_bytes": Target(256, "<=", 0.16),
    "int8_ppl": Target(256, "<=", 1.01),  # held-out perplexity / the fp32 cache's
    "int4_ppl": Target(256, "<=", 1.05),  # with a residual window (kvlib.bench.compress.RESIDUAL)
    # a small model's decode step (python -m kvlib.bench lockstep --model mini-llama), prealloc,
    # batch 1, at one and at two threads; judged for eager and compiled decoding alike
    "mini_near_floor_200": Target(200, "<=", 1.5),  # median decode step / floor
    "mini_faster_than_hf_200": Target(200, ">=", 1.5),  # tokens/s over DynamicCache's
}
QWEN3 = {**BASE, "model": "qwen3-0.6b"}  # the modern targets' cells


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
    """The targets of the models a run measured (gpt2 and Qwen3-0.6B in float32, batch 1, CPU;
    bfloat16 against float32), each met, not met or not measured."""
    res = data["results"]
    out = []
    if find(res, **BASE):
        out += targets_200(res) + targets_1000(res) + shown_rows(res, best_at_200(res))
    if find(res, **QWEN3):
        out += qwen3_targets(res)
    out += bf16_targets(res)
    threads = data["environment"]["threads"]
    if threads != 2:
        for t in out:
            t["detail"] = (t["detail"] + f"; measured with {threads} threads, the targets "
                           "assume 2").lstrip("; ")
    return out


def best_at_200(res: list[dict], cell: dict = BASE) -> dict | None:
    """kvlib's fastest cache at 200 tokens among those that give HF's tokens (sliding attends to
    fewer: not compared)."""
    mine = [r for r in res if r["strategy"] in ("concat", "prealloc") and r["new_tokens"] == 200
            and all(r[k] == v for k, v in cell.items())]
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


def qwen3_targets(res: list[dict]) -> list[dict]:
    best, hf = best_at_200(res, QWEN3), find(res, strategy="hf-dynamic", new_tokens=200, **QWEN3)
    name = best["strategy"] if best else ""
    return [target_row("qwen3_near_floor_200", "Qwen3-0.6B shape, 200 tokens: fastest kvlib "
                       "cache's median decode step / floor", best["floor_ratio"] if best else None,
                       name),
            target_row("qwen3_faster_than_hf_200", "Qwen3-0.6B shape, 200 tokens: fastest kvlib "
                       "cache / transformers' Qwen3ForCausalLM with DynamicCache, decode tokens/s",
                       _ratio(best, hf), name if hf else "")]


def bf16_targets(res: list[dict]) -> list[dict]:
    """For each model run in bfloat16: its prealloc decode step over float32's, and whether the
    greedy tokens stay equal (else the first step where they part)."""
    rows = []
    models = sorted({r["model"] for r in res if r["dtype"] == "bfloat16"})
    for model in models:
        cell = {**BASE, "model": model, "strategy": "prealloc", "new_tokens": 200}
        f32, bf16 = find(res, **cell), find(res, **{**cell, "dtype": "bfloat16"})
        ratio = bf16["step_ms"]["p50"] / f32["step_ms"]["p50"] if f32 and bf16 else None
        rows.append(target_row("bf16_step_200", f"{model}, 200 tokens: bfloat16 prealloc "
                               "median decode step / float32's", ratio, _agreement(f32, bf16)))
    return rows


def _agreement(a: dict | None, b: dict | None) -> str:
    """How far two runs' greedy tokens agree, for the targets' detail column."""
    if not (a and b and a.get("tokens") and b.get("tokens")):
        return ""
    n = len(a["tokens"])
    part = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=True))
                 if x != y), None)
    return (f"same {n} greedy tokens" if part is None
            else f"greedy tokens equal for {part} of {n}, then differ")


LOCKSTEP = [  # (target, what the lockstep run measured of it, how the report names it)
    ("faster_than_hf_200", "kvlib_over_hf_tokens_per_s", "{s} / HF DynamicCache, decode tokens/s"),
    ("near_floor_200", "step_over_floor", "{s} median decode step / floor"),
    ("faster_than_hf_1000", "kvlib_over_hf_tokens_per_s",
     "{s} / HF DynamicCache, decode tokens/s"),
    ("flat_1000", "flatness_per_floor", "{s} median step, last 100 / first 100, each step divided "
     "by the floor step beside it"),
]

LOCKSTEP_COMPILED = [  # gpt2's lockstep run with --compile: compiled decoding, judged alike
    ("faster_than_hf_200", "compiled_over_hf_tokens_per_s",
     "{s} compiled / HF DynamicCache, decode tokens/s"),
    ("near_floor_200", "compiled_over_floor", "{s} compiled median decode step / floor"),
]


SMALL_LOCKSTEP = [  # a small model's lockstep run: eager, then compiled when it ran
    ("mini_faster_than_hf_200", "kvlib_over_hf_tokens_per_s",
     "{s} / HF DynamicCache, decode tokens/s"),
    ("mini_near_floor_200", "step_over_floor", "{s} median decode step / floor"),
    ("mini_faster_than_hf_200", "compiled_over_hf_tokens_per_s",
     "{s} compiled / HF DynamicCache, decode tokens/s"),
    ("mini_near_floor_200", "compiled_over_floor", "{s} compiled median decode step / floor"),
]
LOCKSTEP_AOT = [  # gpt2's lockstep run with --aot: kvlib.aot's step, judged alike
    ("faster_than_hf_200", "aot_over_hf_tokens_per_s",
     "{s} AOT-compiled / HF DynamicCache, decode tokens/s"),
    ("near_floor_200", "aot_over_floor", "{s} AOT-compiled median decode step / floor"),
]
SMALL_LOCKSTEP_AOT = [  # and kvlib.aot's step, when it took turns
    ("mini_faster_than_hf_200", "aot_over_hf_tokens_per_s",
     "{s} AOT-compiled / HF DynamicCache, decode tokens/s"),
    ("mini_near_floor_200", "aot_over_floor", "{s} AOT-compiled median decode step / floor"),
]


def lockstep_targets(d: dict) -> list[dict]:
    """The ratio targets again, from a lockstep run: same rows as ``targets``, marked lockstep;
    a run on another model than gpt2 is judged by the small model's targets, at its threads;
    gpt2's compiled decodings (``compile``, ``aot``), when the run had them, by gpt2's."""
    runs = {r["new_tokens"]: r for r in d["runs"]}
    small = d.get("model", "gpt2") != "gpt2"
    env = d.get("environment", {})
    prefix = (f"{d['model']}, {env['threads']} thread(s), " if small else "")
    where = f" ({env['cpu_model']})" if env.get("cpu_model") else ""  # machine types differ
    out = []
    rows = SMALL_LOCKSTEP if small else LOCKSTEP + (LOCKSTEP_COMPILED if d.get("compiled") else [])
    if d.get("aot"):
        rows = rows + (SMALL_LOCKSTEP_AOT if small else LOCKSTEP_AOT)
    for key, measured, name in rows:
        n = TARGETS[key].new_tokens
        value = runs[n].get(measured, {}).get("median") if n in runs else None
        out.append(target_row(key, prefix + f"{n} tokens, lockstep{where}: "
                              + name.format(s=d["strategy"]), value))
    return out
