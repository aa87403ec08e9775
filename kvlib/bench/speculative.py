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


def step_costs(model, draft, prompt: torch.Tensor, k: int, repeats: int = 30,
               warmup: int = 5) -> dict:
    """Median ms of the three forwards a round is made of, after ``prompt``'s prefill, taking
    turns: the model's decode step (what plain decoding pays a token), the draft's decode step,
    and the model's verification of ``k`` drafts (one forward over ``k + 1`` tokens, then the
    rollback)."""
    L = prompt.shape[1]
    for m in (model, draft):
        m.set_kv_cache("prealloc", max_len=L + k + 2)
    times = {"model_step_ms": [], "draft_step_ms": [], "verify_ms": []}
    x = prompt[:, -(k + 1):]
    with torch.inference_mode():
        for m in (model, draft):
            m(prompt, use_cache=True, last_only=True)
        for i in range(warmup + repeats):
            for name, m, ids in (("model_step_ms", model, x[:, :1]),
                                 ("draft_step_ms", draft, x[:, :1]),
                                 ("verify_ms", model, x)):
                with Stopwatch() as sw:
                    m(ids, use_cache=True, check_ids=False)
                m.crop_kv_cache(L)
                if i >= warmup:
                    times[name].append(1e3 * sw.seconds)
    for m in (model, draft):
        m.reset_kv_cache()
    return {name: median(t) for name, t in times.items()}


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
    costs = step_costs(model, draft, work[0], k) if draft is not None else None
    return {"kind": "speculative", "model": model_name, "draft": draft_name, "prompts": prompts,
            "prompt_len": prompt_len, "new_tokens": n, "draft_tokens": k, "repeats": repeats,
            "warmup": warmup, "variants": rows, "costs": costs, "environment": environment_info()}


def round_cost(d: dict, variant: str) -> float | None:
    """What one round costs, in the model's decode steps: the verification, and for the draft
    model its ``k`` steps (prompt lookup's search is no forward)."""
    c, k = d.get("costs"), d["draft_tokens"]
    if not c:
        return None
    drafting = k * c["draft_step_ms"] if variant == "draft model" else 0.0
    return (drafting + c["verify_ms"]) / c["model_step_ms"]


def why_lines(d: dict, target: float = 1.3) -> list[str]:
    """Why a draft wins or loses, measured: a round's cost against the tokens it commits."""
    c = d.get("costs")
    if not c:
        return []
    k = d["draft_tokens"]
    lines = ["", f"Why, measured (medians after the prompt): the model's decode step takes "
             f"{c['model_step_ms']:.2f} ms, the draft's {c['draft_step_ms']:.2f} ms "
             f"({c['draft_step_ms'] / c['model_step_ms']:.2f} of it: a small model's step is "
             f"mostly fixed cost per layer and call, not its weights), and verifying {k} drafts "
             f"(one forward over {k + 1} tokens) {c['verify_ms']:.2f} ms. Speculation runs at "
             "about (tokens a round commits) / (a round's cost in model steps) times plain:", "",
             "| variant | a round costs (model steps) | tokens a round commits | their ratio | "
             f"tokens a round must commit for {target}x |", "|---|---:|---:|---:|---:|"]
    for v in ("lookup", "draft model"):
        r = d["variants"].get(v)
        cost = round_cost(d, v)
        if r is None or cost is None or "tokens_per_round" not in r:
            continue
        lines.append(f"| {v} | {cost:.2f} | {r['tokens_per_round']:.2f} | "
                     f"{r['tokens_per_round'] / cost:.2f}x | {target * cost:.2f} |")
    r = d["variants"].get("draft model")
    if r and "tokens_per_round" in r:
        verify = c["verify_ms"] / c["model_step_ms"]
        need = (r["tokens_per_round"] / target - verify) / k  # the draft step that would do
        must = target * round_cost(d, "draft model")
        lines += ["", f"A round commits at most {k + 1} tokens. At the draft's measured cost "
                  f"{target}x needs {must:.2f} a round ({must / (k + 1):.0%} of that most); at "
                  f"the {r['tokens_per_round']:.2f} its acceptance gives, it needs a draft step of "
                  + (f"at most {need:.2f} of the model's (measured: "
                     f"{c['draft_step_ms'] / c['model_step_ms']:.2f})." if need > 0 else
                     "less than nothing: the verification alone costs more.")]
    return lines


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
    return lines + why_lines(d)
