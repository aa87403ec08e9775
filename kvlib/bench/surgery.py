"""``python -m kvlib.bench surgery``: the engine's chunked prefill, and the blocks its families
of rows share.

**Chunked prefill.** ``decoders`` requests with short prompts start at step 0 and decode
``decode_tokens`` tokens each; every ``arrive_every`` steps one of ``long_prompts`` requests
with a ``long_len``-token prompt arrives while they decode (random ids and weights; greedy).
Without a budget, the step that prefills a long prompt computes all of it, and every running
request waits that whole step for its next token. With ``Engine(max_batched_tokens=N)`` a step
computes at most ``N`` tokens, decodes first, so the prompt is spread over several steps. Every
step's wall time is the engine's own record (``StepRecord.seconds``, a ``Stopwatch``); a
request's **inter-token latency** is the wall time of the steps from one of its tokens to the
next, pooled over every request: its median (p50) and 99th percentile (p99); time to first
token is counted from the step a long prompt arrives; throughput is the tokens generated over
the run's wall time. Each budget runs ``repeats`` times after ``warmup``; the figures are
medians over the runs.

**Sharing** (no timing): the most blocks held at once by ``n`` samples of one prompt
(``Engine.fork``) and by a beam search of ``k`` beams, against what their block tables list
(what ``n`` or ``k`` separate requests would hold): vLLM reports up to 55% saved.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from ..measure import median, percentiles
from ..serving import Engine, StepRecord
from .serving import random_model


def workload(vocab: int, decoders: int = 8, decode_tokens: int = 64,
             short: tuple[int, int] = (8, 32), long_prompts: int = 4, long_len: int = 384,
             long_tokens: int = 8, arrive_every: int = 8, seed: int = 0
             ) -> list[tuple[torch.Tensor, int, int]]:
    """``(prompt, max_new_tokens, arrival_step)``: the decoders first, then the long prompts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(decoders):
        n = int(torch.randint(short[0], short[1] + 1, (1,), generator=g))
        out.append((torch.randint(0, vocab, (n,), generator=g), decode_tokens, 0))
    for i in range(long_prompts):
        out.append((torch.randint(0, vocab, (long_len,), generator=g), long_tokens,
                    arrive_every * (i + 1)))
    return out


def token_steps(history: list[StepRecord]) -> dict[int, list[int]]:
    """Request id -> the steps in which it got a token (the step its prompt was done, then every
    step it decoded)."""
    steps: dict[int, list[int]] = {}
    for rec in history:
        for rid in rec.joined + rec.decoded:
            steps.setdefault(rid, []).append(rec.step)
    return steps


def inter_token_latencies(history: list[StepRecord]) -> dict[int, list[float]]:
    """Request id -> seconds from each of its tokens to the next: the wall time of every step
    after the one that gave the first token, up to the one that gave the second."""
    ends = np.cumsum([0.0] + [rec.seconds for rec in history])  # ends[s + 1]: end of step s
    return {rid: [float(ends[b + 1] - ends[a + 1]) for a, b in zip(s, s[1:], strict=False)]
            for rid, s in token_steps(history).items()}


def first_token_latencies(history: list[StepRecord], arrivals: dict[int, int]
                          ) -> dict[int, float]:
    """Request id -> seconds from the start of its arrival step to the end of its first token's
    step."""
    ends = np.cumsum([0.0] + [rec.seconds for rec in history])
    return {rid: float(ends[s[0] + 1] - ends[arrivals[rid]])
            for rid, s in token_steps(history).items()}


def _run(model, work, budget: int | None, block_size: int) -> tuple[Engine, list[torch.Tensor]]:
    longest = max(p.shape[0] + n for p, n, _ in work)
    num_blocks = len(work) * -(-longest // block_size)  # room for every request at once
    engine = Engine(model, block_size=block_size, num_blocks=num_blocks,
                    max_batched_tokens=budget)
    ids = [engine.add_request(p, n, arrival_step=a) for p, n, a in work]
    out = engine.run()
    return engine, [out[i] for i in ids]


def _summary(engine: Engine, long_ids: list[int]) -> dict:
    """What one run gave: latencies (ms), throughput, and the steps' work."""
    h = engine.history
    gaps = [x for v in inter_token_latencies(h).values() for x in v]
    arrivals = {rid: r.arrival_step for rid, r in engine.requests.items()}
    ttft = first_token_latencies(h, arrivals)
    wall = sum(rec.seconds for rec in h)
    made = sum(len(r.output) for r in engine.requests.values())
    p = percentiles(gaps)
    return {"p50_itl_ms": p["p50"] * 1e3, "p99_itl_ms": p["p99"] * 1e3,
            "max_itl_ms": max(gaps) * 1e3,
            "long_ttft_ms": median(ttft[i] for i in long_ids) * 1e3,
            "tokens_per_s": made / wall, "wall_s": wall, "steps": len(h),
            "max_step_tokens": max(rec.tokens for rec in h)}


def chunked_prefill(model_name: str = "mini-llama",
                    budgets: tuple[int | None, ...] = (None, 512, 128, 32), decoders: int = 8,
                    decode_tokens: int = 64, long_prompts: int = 4, long_len: int = 384,
                    arrive_every: int = 8, block_size: int = 16, repeats: int = 3,
                    warmup: int = 1, seed: int = 0, progress: bool = True) -> dict:
    """Measure the chunked-prefill half; see the module docstring."""
    model = random_model(model_name)
    work = workload(model.cfg.vocab_size, decoders, decode_tokens, long_prompts=long_prompts,
                    long_len=long_len, arrive_every=arrive_every, seed=seed)
    long_ids = list(range(decoders, len(work)))
    runs, outputs = {}, {}
    bar = tqdm(total=len(budgets) * (warmup + repeats), desc="chunked prefill",
               disable=not progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a RoPE model past its trained context warns once
        for budget in budgets:
            done = []
            for i in range(warmup + repeats):
                engine, outputs[budget] = _run(model, work, budget, block_size)
                if i >= warmup:
                    done.append(_summary(engine, long_ids))
                bar.update()
            runs["none" if budget is None else str(budget)] = {
                k: median(d[k] for d in done) for k in done[0]}
    bar.close()
    first = outputs[budgets[0]]
    same = all(all(torch.equal(a, b) for a, b in zip(o, first, strict=True))
               for o in outputs.values())
    return {"kind": "chunked", "model": model_name, "decoders": decoders,
            "decode_tokens": decode_tokens, "long_prompts": long_prompts, "long_len": long_len,
            "arrive_every": arrive_every, "block_size": block_size, "repeats": repeats,
            "warmup": warmup, "threads": torch.get_num_threads(), "runs": runs,
            "same_tokens": same}


def _peak_saving(engine: Engine) -> dict:
    """The step holding the most blocks: blocks used, what the tables list, the share saved."""
    rec = max(engine.history, key=lambda r: r.stats["blocks_used"])
    used, listed = rec.stats["blocks_used"], rec.stats["blocks_unshared"]
    return {"blocks_used": used, "blocks_unshared": listed,
            "saved_pct": 100.0 * (1 - used / listed) if listed else 0.0}


def sharing(model_name: str = "mini-llama", prompt_len: int = 200, new_tokens: int = 32,
            samples: tuple[int, ...] = (2, 4, 8), beams: tuple[int, ...] = (2, 4),
            block_size: int = 16, seed: int = 0) -> dict:
    """Blocks held by ``n`` samples of one prompt (a request and ``n - 1`` forks, temperature
    1) and by beam searches, at their peak, against the blocks their tables list."""
    model = random_model(model_name)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=g)
    rows = max(*samples, *beams)
    num_blocks = rows * -(-(prompt_len + new_tokens) // block_size)
    out = {"prompt_len": prompt_len, "new_tokens": new_tokens, "block_size": block_size,
           "samples": {}, "beams": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in samples:
            engine = Engine(model, block_size=block_size, num_blocks=num_blocks)
            first = engine.add_request(prompt, new_tokens, temperature=1.0, seed=seed)
            if n > 1:
                engine.fork(first, n=n - 1, seed=seed + 1)
            engine.run()
            out["samples"][n] = _peak_saving(engine)
        for k in beams:
            engine = Engine(model, block_size=block_size, num_blocks=num_blocks)
            engine.add_request(prompt, new_tokens, num_beams=k)
            engine.run()
            out["beams"][k] = _peak_saving(engine)
    return out


def chunking_pays(c: dict, latency: float = 0.5, throughput: float = 0.9) -> list[str]:
    """The budgets of a ``chunked_prefill`` run whose p99 inter-token latency is at most
    ``latency`` times that without a budget, at ``throughput`` times its tokens/s or more."""
    base = c["runs"]["none"]
    return [b for b, r in c["runs"].items() if b != "none"
            and r["p99_itl_ms"] <= latency * base["p99_itl_ms"]
            and r["tokens_per_s"] >= throughput * base["tokens_per_s"]]


def surgery_lines(d: dict) -> list[str]:
    """The Markdown section of a ``surgery`` run: chunked prefill, then sharing."""
    c, s = d["chunked"], d["sharing"]
    lines = ["## Chunked prefill and shared blocks (the engine)", "",
             f"`{c['model']}` (random weights): {c['decoders']} requests decode "
             f"{c['decode_tokens']} tokens each while {c['long_prompts']} prompts of "
             f"{c['long_len']} tokens arrive, one every {c['arrive_every']} steps; "
             f"{c['threads']} threads; medians of {c['repeats']} runs after {c['warmup']} "
             f"warm-up. Same tokens at every budget: {'yes' if c['same_tokens'] else 'no'}. "
             f"Command: `{d.get('command', 'python -m kvlib.bench surgery')}`", "",
             "| max_batched_tokens | p50 inter-token ms | p99 | p99 / none | max | long prompt: "
             "first token ms | tokens/s | tokens/s / none | steps | most tokens in a step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = c["runs"].get("none")
    for budget, r in c["runs"].items():
        p99_x, tps_x = ((f"{r['p99_itl_ms'] / base['p99_itl_ms']:.2f}x",
                         f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x") if base else ("", ""))
        lines.append(f"| {budget} | {r['p50_itl_ms']:.2f} | {r['p99_itl_ms']:.2f} | {p99_x} | "
                     f"{r['max_itl_ms']:.2f} | {r['long_ttft_ms']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {tps_x} | {r['steps']:.0f} | "
                     f"{r['max_step_tokens']:.0f} |")
    if base:
        good = chunking_pays(c)
        lines += ["", "Target: a budget whose p99 inter-token latency is at most half that "
                  "without one, with the throughput within 10%: "
                  + (f"met at {', '.join(good)}." if good else "**not met** at any budget.")]
    lines += ["", f"Blocks at the peak, a prompt of {s['prompt_len']} tokens and "
              f"{s['new_tokens']} new ones, blocks of {s['block_size']}: held (shared) against "
              "listed by the tables (what separate requests would hold).", "",
              "| rows | held | listed | saved |", "|---|---:|---:|---:|"]
    for kind, label in (("samples", "samples (fork)"), ("beams", "beams")):
        for n, r in s[kind].items():
            lines.append(f"| {n} {label} | {r['blocks_used']} | {r['blocks_unshared']} | "
                         f"{r['saved_pct']:.1f}% |")
    return lines + [""]
