"""``python -m kvlib.bench speculative``: speculative decoding on the trained model, continuing
held-out code, against plain decoding and against transformers' assisted generation on the
same weights.

Every prompt is ``prompt_len`` tokens of a held-out file (``kvlib.held_out``, cut into
``prompts`` pieces); each variant continues it greedily for ``new_tokens`` tokens. Variants:
plain decoding (``cache="prealloc"``), prompt lookup and the draft model (``draft=``, each at
``draft_tokens``), and, with transformers installed, ``generate`` of the same weights plain, with
``prompt_lookup_num_tokens=`` and with ``assistant_model=`` (its own draft length left to its
heuristic unless ``hf_fixed``). Per repeat the variants run in turn on every prompt (the order
flipped every repeat, after ``warmup`` untimed passes); a variant's tokens/s is its tokens over
its wall time, summed over the prompts, and the figure is the median over repeats. Greedy, so
kvlib's speculative runs must give the tokens of its plain run (checked); transformers' plain run
is compared token for token too (float differences may flip a near tie).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..evaluate import held_out
from ..generate import generate
from ..loading import load_model
from ..machine import environment_info
from ..measure import median
from ..timing import Stopwatch
from .runners import hf_twin


def _prompts(model_name: str, n: int, length: int) -> list[torch.Tensor]:
    text = held_out(model_name)  # (1, 4096)
    step = (text.shape[1] - length) // max(n, 1)
    return [text[:, i * step : i * step + length] for i in range(n)]


def _kvlib(model, prompts, n, **kw) -> tuple[float, list[torch.Tensor], dict]:
    out, seconds, drafted, accepted, rounds = [], 0.0, 0, 0, 0
    for p in prompts:
        with Stopwatch() as sw:
            r = generate(model, p, n, cache="prealloc", **kw)
        seconds += sw.seconds
        out.append(r.tokens)
        if r.speculation is not None:
            s = r.speculation
            drafted, accepted = drafted + s.drafted, accepted + s.accepted
            rounds += s.rounds
    stats = {"drafted": drafted, "accepted": accepted, "rounds": rounds}
    return seconds, out, stats


def _hf(hf, prompts, n, **kw) -> tuple[float, list[torch.Tensor]]:
    out, seconds = [], 0.0
    for p in prompts:
        with Stopwatch() as sw, torch.no_grad():
            tokens = hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
        seconds += sw.seconds
        out.append(tokens)
    return seconds, out


def speculative(model_name: str = "mini-llama", draft_name: str | None = "mini-llama-draft",
                prompts: int = 8, prompt_len: int = 128, new_tokens: int = 128,
                draft_tokens: int = 4, repeats: int = 3, warmup: int = 1, hf: bool = True,
                progress: bool = True) -> dict:
    """Tokens/s, acceptance and token equality of every variant (see the module docstring)."""
    model = load_model(model_name)
    draft = load_model(draft_name) if draft_name else None
    work = _prompts(model_name, prompts, prompt_len)
    n, k = new_tokens, draft_tokens
    variants = {"plain": lambda: _kvlib(model, work, n),
                "lookup": lambda: _kvlib(model, work, n, draft="lookup", draft_tokens=k)}
    if draft is not None:
        variants["draft model"] = lambda: _kvlib(model, work, n, draft=draft, draft_tokens=k)
    if hf:
        twin = hf_twin(model)
        twin.generation_config.eos_token_id = None
        variants["hf plain"] = lambda: (*_hf(twin, work, n), {})
        variants["hf lookup"] = lambda: (*_hf(twin, work, n, prompt_lookup_num_tokens=k), {})
        if draft is not None:
            assistant = hf_twin(draft)
            assistant.generation_config.eos_token_id = None
            variants["hf draft model"] = lambda: (*_hf(twin, work, n, assistant_model=assistant),
                                                  {})
    names = list(variants)
    seconds = {v: [] for v in names}
    tokens, stats = {}, {}
    bar = tqdm(total=(warmup + repeats) * len(names), disable=not progress, desc="speculative")
    for r in range(warmup + repeats):
        for v in (names if r % 2 == 0 else names[::-1]):
            s, out, st = variants[v]()
            if r >= warmup:
                seconds[v].append(s)
            tokens[v], stats[v] = out, st
            bar.update(1)
    bar.close()
    plain = tokens["plain"]
    rows = {}
    for v in names:
        tps = prompts * n / median(seconds[v])
        same = sum(bool(torch.equal(a[:, -n:], b[:, -n:])) for a, b in zip(tokens[v], plain,
                                                                          strict=True))
        st = stats[v]
        rows[v] = {"tokens_per_s": tps, "seconds": seconds[v], "same_as_plain": same,
                   **({"acceptance": st["accepted"] / st["drafted"] if st["drafted"] else None,
                       "tokens_per_round": (st["accepted"] + st["rounds"]) / st["rounds"]}
                      if st.get("rounds") else {})}
    for v in names:
        rows[v]["vs_plain"] = rows[v]["tokens_per_s"] / rows["plain"]["tokens_per_s"]
    for ours, theirs in (("lookup", "hf lookup"), ("draft model", "hf draft model")):
        if ours in rows and theirs in rows:
            rows[ours]["vs_hf"] = rows[ours]["tokens_per_s"] / rows[theirs]["tokens_per_s"]
    return {"kind": "speculative", "model": model_name, "draft": draft_name, "prompts": prompts,
            "prompt_len": prompt_len, "new_tokens": n, "draft_tokens": k, "repeats": repeats,
            "warmup": warmup, "variants": rows, "environment": environment_info()}


def speculative_lines(d: dict) -> list[str]:
    """The RESULTS.md section: one row per variant."""
    e = d["environment"]
    lines = ["## Speculative decoding (prompt lookup, a draft model, transformers' assisted "
             "generation)", "",
             f"`{d['model']}` (draft `{d['draft']}`), {d['prompts']} held-out prompts of "
             f"{d['prompt_len']} tokens, {d['new_tokens']} new tokens each, greedy, "
             f"{d['draft_tokens']} drafts a round; median of {d['repeats']} runs after "
             f"{d['warmup']} warm-up; {e['cpu_model']}, {e['threads']} thread(s), load "
             f"{e['load_avg'][0]:.1f}. Command: `{d.get('command', '')}`.", "",
             "| variant | tokens/s | vs plain | vs transformers' | kept drafts | tokens per "
             "forward | same tokens as plain |", "|---|---|---|---|---|---|---|"]
    for name, r in d["variants"].items():
        acc = "" if r.get("acceptance") is None else f"{r['acceptance']:.0%}"
        per = "" if "tokens_per_round" not in r else f"{r['tokens_per_round']:.2f}"
        vs_hf = "" if "vs_hf" not in r else f"{r['vs_hf']:.2f}x"
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['vs_plain']:.2f}x | {vs_hf} | "
                     f"{acc} | {per} | {r['same_as_plain']}/{d['prompts']} |")
    return lines
