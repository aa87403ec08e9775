"""``python -m kvlib.bench serving``: many requests at once, four ways.

One fixed workload of ``n`` requests (random token ids, random weights; greedy): each request's
own prompt and its output length are drawn uniformly from ``prompt`` and ``output``, and every
second request starts with the same ``system``-token system prompt. All arrive at step 0.

- **one at a time**: ``kvlib.generate`` per request, a prealloc cache;
- **static batches**: ``batch`` requests at a time in arrival order, padded on the left, each
  batch running until its longest output (kvlib's ``generate`` with a prealloc cache, and
  transformers' ``generate`` with an attention mask on the same weights);
- **engine**: ``kvlib.Engine`` (continuous batching over a paged cache), with prefix caching and
  without, its pool as large as what the static batches reserve up front.

Tokens per second count only the tokens the requests asked for. KV memory is averaged over the
engine's steps (every step weighs the same): what the running requests would reserve if each had
a contiguous cache for the workload's longest request, what the static batches' padded caches
hold, and what the paged pool holds. A last section times a decode step of ``batch`` sequences
of equal length through the paged cache and through a contiguous prealloc cache. Every time is
the median of ``repeats`` passes after ``warmup``.
"""

from __future__ import annotations

import statistics
import warnings

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..caches.paged_kernel import kernel_runs
from ..generate import generate, pad_prompts
from ..loading import load_model
from ..machine import environment_info
from ..measure import median, median_ms
from ..serving import Engine
from ..state import model_device
from ..timing import Stopwatch
from .targets import target_row

PAGED_HOW = {True: "block tables, slots and kvlib's paged decode kernel included",  # as run
             False: "block tables, slots and the gather included (no paged decode kernel)",
             None: "block tables, slots and attention included"}


def random_model(name: str):
    """Seeded random weights of a preset's shape, even for a model trained here ("mini-llama"):
    the workload's ids are random, so trained weights would have nothing to say about them."""
    return load_model(name, pretrained=False, seed=0)


def workload(vocab: int, n: int = 32, system: int = 200, prompt: tuple[int, int] = (8, 64),
             output: tuple[int, int] = (8, 64), seed: int = 0
             ) -> list[tuple[torch.Tensor, int]]:
    """``n`` (prompt, max_new_tokens): own prompts and outputs uniform in the given ranges
    (inclusive), a shared system prompt before every second one."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, vocab, (system,), generator=g)
    out = []
    for i in range(n):
        own = torch.randint(0, vocab, (int(torch.randint(prompt[0], prompt[1] + 1, (1,),
                                                         generator=g)),), generator=g)
        new = int(torch.randint(output[0], output[1] + 1, (1,), generator=g))
        out.append((torch.cat([shared, own]) if i % 2 else own, new))
    return out


def _one_at_a_time(model, work) -> tuple[float, list[torch.Tensor]]:
    outs = []
    with Stopwatch(model_device(model)) as sw:
        for p, n in work:
            outs.append(generate(model, p[None], n, cache="prealloc").tokens[0])
    return sw.seconds, outs


def _batches(work, size: int):
    return [work[i : i + size] for i in range(0, len(work), size)]


def _static(model, work, size: int) -> tuple[float, list[torch.Tensor], list[tuple[int, int]]]:
    """kvlib's padded batches; also (reserved, used) token slots at every decode step."""
    outs, slots = [], []
    with Stopwatch(model_device(model)) as sw:
        for batch in _batches(work, size):
            n = max(m for _, m in batch)
            res = generate(model, [p for p, _ in batch], n, cache="prealloc")
            outs += [s[: p.shape[0] + m] for s, (p, m) in zip(res.sequences, batch, strict=True)]
            T = res.prompt_len
            for i in range(n):  # the padded cache holds B x (T + i); the real tokens fewer
                used = sum(p.shape[0] + min(i, m) for p, m in batch if i < m)
                slots.append((len(batch) * (T + i), used))
    return sw.seconds, outs, slots


def _hf_static(hf, work, size: int) -> tuple[float, list[torch.Tensor]]:
    outs = []
    with Stopwatch(hf.device) as sw:
        for batch in _batches(work, size):
            outs += _hf_batch(hf, batch)
    return sw.seconds, outs


def _hf_batch(hf, batch) -> list[torch.Tensor]:
    """One padded batch through transformers' ``generate``; each row without its padding."""
    outs = []
    n = max(m for _, m in batch)
    idx, pad = pad_prompts([p for p, _ in batch])
    mask = torch.ones_like(idx)
    if pad is not None:
        for b, k in enumerate(pad.tolist()):
            mask[b, :k] = 0
    with torch.inference_mode():  # no eos: every row runs n steps, as kvlib's do
        out = hf.generate(input_ids=idx, attention_mask=mask, max_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    for b, (_, m) in enumerate(batch):
        k = 0 if pad is None else int(pad[b])
        outs.append(out[b, k : idx.shape[1] + m])
    return outs


def _engine(model, work, block_size: int, num_blocks: int, prefix: bool):
    engine = Engine(model, block_size=block_size, num_blocks=num_blocks, prefix_caching=prefix)
    ids = [engine.add_request(p, n) for p, n in work]
    with Stopwatch(model_device(model)) as sw:
        out = engine.run()
    return sw.seconds, [out[i] for i in ids], engine


def _waste(reserved: int, used: int) -> float:
    return 100.0 * (1 - used / reserved) if reserved else 0.0


def _busy_means(engine: Engine) -> dict[str, float]:
    """``Engine.slots_by_step``, averaged over the steps with a request running."""
    s = engine.slots_by_step()
    busy = [i for i, n in enumerate(s["running"]) if n]
    return {k: statistics.fmean(v[i] for i in busy) for k, v in s.items()}


def _memory(engine: Engine, work, static_slots, per_token: int) -> dict:
    """Average reserved and used bytes over the steps of each way of holding the cache."""
    longest = max(p.shape[0] + n for p, n in work)
    m = _busy_means(engine)
    mean = statistics.fmean
    rows = {  # (reserved, used) token slots; prealloc uses every request's own tokens
        "prealloc to the longest request": (m["running"] * longest, m["tokens"]),
        "static batch (padded, prealloc)": (mean(r for r, _ in static_slots),
                                            mean(u for _, u in static_slots)),
        "paged (engine)": (m["paged"], m["used"]),
    }
    return {k: {"reserved_bytes": r * per_token, "used_bytes": u * per_token,
                "waste_pct": _waste(r, u)} for k, (r, u) in rows.items()}


def _prealloc_steps(model, ids: Tensor, steps: int) -> tuple[float, Tensor]:
    """Median of ``steps`` timed prealloc decode steps (ms), and the tokens."""
    res = generate(model, ids, steps + 1, cache="prealloc")
    model.reset_kv_cache()
    return median_ms(res.step_times), res.tokens


def _paged_steps(model, ids: Tensor, steps: int, block_size: int) -> tuple[float, list[Tensor]]:
    """Median of ``steps`` timed engine decode steps (ms) over the paged cache, and each row's
    tokens."""
    batch, length = ids.shape
    per = -(-(length + steps + 1) // block_size)
    engine = Engine(model, block_size=block_size, num_blocks=batch * per)
    for b in range(batch):
        engine.add_request(ids[b], steps + 1)
    engine.step()  # every prefill
    paged = []
    for _ in range(steps):
        before = engine.decode_seconds
        engine.step()
        paged.append(engine.decode_seconds - before)
    return median_ms(paged), [engine.result(b) for b in range(batch)]


def _step_ratio(model, batch: int, length: int, steps: int, block_size: int,
                repeats: int = 3) -> dict:
    """Median decode step of ``batch`` equal sequences: paged (engine) against prealloc, in
    ``repeats`` turns whose order alternates (so that drift hits both alike); the ratio is the
    median of the turns' ratios."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, length), generator=g)
    generate(model, ids, 2, cache="prealloc")  # a warm-up: the first buffers of this shape
    paged_ms, contiguous_ms, same = [], [], True
    for r in range(repeats):
        if r % 2 == 0:
            c, seq = _prealloc_steps(model, ids, steps)
        p, outs = _paged_steps(model, ids, steps, block_size)
        if r % 2 == 1:
            c, seq = _prealloc_steps(model, ids, steps)
        paged_ms.append(p)
        contiguous_ms.append(c)
        same = same and all(torch.equal(outs[b], seq[b]) for b in range(batch))
    ratios = [p / c for p, c in zip(paged_ms, contiguous_ms, strict=True)]
    spec = model.layer_specs()[0]
    kernel = kernel_runs(model.cfg.n_heads, spec.n_kv_heads, spec.head_dim)
    return {"batch": batch, "length": length, "repeats": repeats, "kernel": kernel,
            "contiguous_ms": median(contiguous_ms), "paged_ms": median(paged_ms),
            "ratio": median(ratios), "ratios": ratios, "same_tokens": same}


def waste_by_block_size(work, pool_tokens: int, sizes: tuple[int, ...] = (1, 4, 8, 16, 32)
                        ) -> dict[int, float]:
    """The paged pool's waste (%, averaged over the steps) at several block sizes, with the same
    bytes in the pool. It depends only on the requests' lengths (no request stops early), so a
    tiny model runs the schedule."""
    model = random_model("tiny-llama")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # past the tiny model's trained context: it warns
        for bs in sizes:
            out[bs] = _paged_waste(model, work, bs, pool_tokens // bs)
    return out


def _paged_waste(model, work, bs: int, num_blocks: int) -> float:
    engine = Engine(model, block_size=bs, num_blocks=num_blocks)
    for p, n in work:
        engine.add_request(p, n)
    engine.run()
    m = _busy_means(engine)
    return _waste(m["paged"], m["used"])


def _hf_model(model):
    from .runners import hf_twin

    hf = hf_twin(model)
    hf.generation_config.eos_token_id = None  # random weights: run every row to its end
    return hf


def _one_pass(model, hf, work, batch: int, block_size: int, num_blocks: int):
    """Every way once: ``{way: (seconds, outputs)}``, the static batches' slots, and the two
    engines (with and without prefix caching), for their accounting."""
    s, alone = _one_at_a_time(model, work)
    results = {"one at a time": (s, alone)}
    s, outs, static_slots = _static(model, work, batch)
    results["static batch (kvlib)"] = (s, outs)
    if hf is not None:
        results["static batch (transformers)"] = _hf_static(hf, work, batch)
    engines = {}
    for prefix in (True, False):
        s, outs, engines[prefix] = _engine(model, work, block_size, num_blocks, prefix)
        results["engine" if prefix else "engine, no prefix caching"] = (s, outs)
    return results, static_slots, engines


def serving(model_name: str = "mini-llama", n: int = 32, system: int = 200,
            prompt: tuple[int, int] = (8, 64), output: tuple[int, int] = (8, 64),
            batch: int = 8, block_size: int = 16, repeats: int = 3, warmup: int = 1,
            compare_hf: bool = True, step_length: int = 256, step_count: int = 24,
            progress: bool = True) -> dict:
    """Measure; see the module docstring."""
    model = random_model(model_name)
    work = workload(model.cfg.vocab_size, n, system, prompt, output)
    longest = max(p.shape[0] + m for p, m in work)
    num_blocks = batch * -(-longest // block_size)  # what the static batches reserve
    hf = _hf_model(model) if compare_hf else None
    ways = [w for w in ("one at a time", "static batch (kvlib)", "static batch (transformers)",
                        "engine", "engine, no prefix caching")
            if hf is not None or "transformers" not in w]
    times = {w: [] for w in ways}
    prefill_s = {True: [], False: []}
    same = {}
    bar = tqdm(total=(warmup + repeats) * len(ways), desc=f"serving {model_name}",
               disable=not progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a RoPE model past its trained context warns once
        for i in range(warmup + repeats):
            results, static_slots, engines = _one_pass(model, hf, work, batch, block_size,
                                                       num_blocks)
            alone = results["one at a time"][1]
            for w, (s, outs) in results.items():
                if i >= warmup:
                    times[w].append(s)
                same[w] = all(torch.equal(a, b) for a, b in zip(outs, alone, strict=True))
                bar.update()
            if i >= warmup:
                for prefix, engine in engines.items():
                    prefill_s[prefix].append(engine.prefill_seconds)
            shared_engine = engines[True]
        bar.close()
        step = _step_ratio(model, batch, min(step_length, model.cfg.context_length - step_count
                                             - 1), step_count, block_size)
    model.reset_kv_cache()
    wanted = sum(m for _, m in work)
    tps = {w: wanted / median(t) for w, t in times.items()}
    per_token = shared_engine.storage.block_nbytes // block_size
    memory = _memory(shared_engine, work, static_slots, per_token)
    hits = shared_engine.stats["prefix_hit_tokens"]
    prefix = {"prefill_s_with": median(prefill_s[True]),
              "prefill_s_without": median(prefill_s[False]),
              "hit_tokens": hits, "bytes_saved": hits * per_token}
    d = {"kind": "serving", "model": model_name, "n": n, "system": system, "prompt": prompt,
         "output": output, "batch": batch, "block_size": block_size, "num_blocks": num_blocks,
         "wanted_tokens": wanted,
         "mean_tokens": statistics.fmean(p.shape[0] + m for p, m in work), "repeats": repeats,
         "warmup": warmup,
         "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype)[6:],
         "device": "cpu", "environment": environment_info(), "tokens_per_s": tps,
         "same_tokens": same, "memory": memory, "prefix": prefix, "step": step}
    d["waste_by_block_size"] = waste_by_block_size(work, num_blocks * block_size)
    d["targets"] = serving_targets(d)
    return d


def serving_targets(d: dict) -> list[dict]:
    tps = d["tokens_per_s"]
    hf = tps.get("static batch (transformers)")
    return [
        target_row("engine_vs_hf_padded", "engine / transformers' padded batch generate, "
                   "tokens/s", tps["engine"] / hf if hf else None),
        target_row("paged_waste", "paged: KV memory reserved but unused, %",
                   d["memory"]["paged (engine)"]["waste_pct"]),
        target_row("paged_step", f"paged decode step / prealloc, batch {d['step']['batch']}",
                   d["step"].get("ratio", d["step"]["paged_ms"] / d["step"]["contiguous_ms"])),
    ]


def _turns(s: dict) -> str:
    """How the step ratio was taken, for runs that took it in turns."""
    if "ratios" not in s:
        return ""
    return (f" (medians of {s['repeats']} turns in alternating order; paged / prealloc "
            f"{s['ratio']:.3f}, turns {min(s['ratios']):.3f}-{max(s['ratios']):.3f})")


def serving_lines(runs: list[dict]) -> list[str]:
    """The Markdown section of one or more serving runs (one per model)."""
    lines = ["## Serving many requests (batching, paged cache, continuous batching)", ""]
    for d in runs:
        env = d["environment"]
        lines += [
            f"### `{d['model']}` (random weights)", "",
            f"{d['n']} requests, all at step 0: own prompt uniform in {d['prompt'][0]}.."
            f"{d['prompt'][1]} tokens, output uniform in {d['output'][0]}..{d['output'][1]}, a "
            f"shared {d['system']}-token system prompt on every second one "
            f"({d['wanted_tokens']} tokens asked for). Static batches of {d['batch']}; the "
            f"engine's pool: {d['num_blocks']} blocks of {d['block_size']} tokens (what the static "
            f"batches "
            f"reserve). {d['dtype']} on {d['device']}, {d['threads']} threads, "
            f"{env.get('cpu_model', '?')}, torch {env.get('torch', '?')}, load average "
            f"{env.get('load_avg', [float('nan')])[0]:.2f} at the start; median of "
            f"{d['repeats']} passes after {d['warmup']} warm-up. "
            f"Command: `{d.get('command', 'python -m kvlib.bench serving')}`", "",
            "| way | tokens/s | x one at a time | same tokens as alone |", "|---|---:|---:|---|"]
        one = d["tokens_per_s"]["one at a time"]
        for w, v in d["tokens_per_s"].items():
            lines.append(f"| {w} | {v:.1f} | {v / one:.2f}x | "
                         f"{'yes' if d['same_tokens'][w] else 'no'} |")
        lines += ["", "| KV memory (mean over the engine's steps) | reserved KiB | used KiB | "
                  "waste |", "|---|---:|---:|---:|"]
        for k, m in d["memory"].items():
            lines.append(f"| {k} | {m['reserved_bytes'] / 1024:,.0f} | "
                         f"{m['used_bytes'] / 1024:,.0f} | {m['waste_pct']:.1f}% |")
        sweep = d.get("waste_by_block_size", {})
        if sweep:
            lines += ["", "Waste of the paged pool by block size in tokens (same bytes in the "
                      "pool; it depends only on the lengths): " + ", ".join(
                          f"{bs}: {w:.1f}%" for bs, w in sweep.items()) + "."]
        p, s = d["prefix"], d["step"]
        lines += ["", f"Prefix caching: {p['hit_tokens']} prompt tokens found in the pool, "
                  f"{p['bytes_saved'] / 1024:,.0f} KiB not computed or stored again; the "
                  f"engine's prefill time {p['prefill_s_with']:.2f} s with it, "
                  f"{p['prefill_s_without']:.2f} s without.", "",
                  f"Decode step, {s['batch']} sequences of {s['length']} tokens: paged "
                  f"{s['paged_ms']:.2f} ms ({PAGED_HOW[s.get('kernel')]}), prealloc "
                  f"{s['contiguous_ms']:.2f} ms{_turns(s)}; same tokens: "
                  f"{'yes' if s['same_tokens'] else 'no'}.",
                  "", "| target | value | limit | met |", "|---|---:|---:|---|"]
        for t in d["targets"]:
            met = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
            unit = "%" if "%" in t["target"] else "x"
            value = "-" if t["value"] is None else f"{t['value']:.2f}{unit}"
            lines.append(f"| {t['target']} | {value} | {t['op']} {t['limit']} | {met} |")
        lines += _why_missed(d)
        lines.append("")
    return lines


def _why_missed(d: dict) -> list[str]:
    """A paragraph for each target a run missed: why, on this machine."""
    lines, (waste, step) = [], d["targets"][1:3]
    if waste["met"] is False:
        lines += ["", f"Why the paged waste is above {waste['limit']:.0f}%: only the last "
                  "block of each running request is partly empty, about half a block each; "
                  f"with blocks of {d['block_size']} and requests that average "
                  f"{d['mean_tokens']:.0f} tokens that is the figure above. vLLM's under 4% "
                  "is for longer requests; smaller blocks waste less (the sweep above)."]
    if step["met"] is False:  # the gather: a copy of the live blocks per layer and step
        how = ("its attention gathered every row's blocks (no C compiler built the paged "
               "kernel)" if d["step"].get("kernel") is False else "it builds every row's "
               "block table and slots in Python")
        lines += ["", f"Why the paged step is slower: {how}; `python -m kvlib.bench "
                  "flexpaged` times one layer's attention each way."]
    return lines
