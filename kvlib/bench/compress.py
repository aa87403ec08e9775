"""``python -m kvlib.bench compress``: quantized and evicting caches, accuracy against memory.

``mini-llama`` (trained): its long held-out text (4,096 tokens) cut into windows of its context
(256 tokens), streamed token by token through each cache as one batch; perplexity and the share of
positions whose argmax (the greedy next token) equals the full-precision cache's; bytes held per
sequence after a full context, read from the caches; the median decode step over the last
``steps`` positions of a context. GPT-2 124M with random weights (the real shape): bytes at its
full context (1,024 tokens, read from one layer's cache, times 12 layers) and the decode step at
``gpt2_at`` tokens. If ``optimum-quanto`` or ``hqq`` can be imported, transformers'
``QuantizedCache`` runs on the same weights (``kvlib.hf.llama.to_hf_model``) and the same windows.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..caches import EvictCache, QuantizedCache
from ..evaluate import held_out, perplexity
from ..loading import load_model
from ..machine import environment_info
from ..measure import CONFIGS, RESIDUAL, measure_frontier, median_ms, step_ms
from ..timing import Stopwatch
from .targets import target_row

GPT2_CONFIGS: dict[str, dict] = {
    "fp32 (full)": {"cache": "prealloc"},
    "bf16": {"cache": "bf16"},
    "int8": {"cache": "quantized", "bits": 8, "group_size": 64},
    "int4": {"cache": "quantized", "bits": 4, "group_size": 64},
    "int4 + residual 128": {"cache": "quantized", "bits": 4, "group_size": 64, "residual": 128},
    "evict 256": {"cache": "evict", "budget": 256, "n_sink": 4},
}
HF_RUNS = {  # label -> QuantizedCache arguments (transformers' KIVI-like cache)
    "HF QuantizedCache quanto int4": {"backend": "quanto", "nbits": 4},
    "HF QuantizedCache hqq int4": {"backend": "hqq", "nbits": 4},
    "HF QuantizedCache hqq int8": {"backend": "hqq", "nbits": 8},
}


def layer_bytes(options: dict, kv_heads: int, tokens: int, head_dim: int) -> int:
    """Bytes one layer's cache holds after ``tokens`` tokens of random keys and values, fed as
    the model feeds them (one call; an evicting cache holds its budget)."""
    opts = {k: v for k, v in options.items() if k != "cache"}
    k = torch.randn(1, kv_heads, tokens, head_dim)
    kind = options["cache"]
    if kind == "evict":
        cache = EvictCache(**opts)
        k = k[:, :, : cache.budget]
    elif kind == "quantized":
        cache = QuantizedCache(**opts)
    else:
        return 2 * kv_heads * tokens * head_dim * (2 if kind == "bf16" else 4)
    cache.update(k, k.clone())
    return cache.nbytes


def gpt2_rows(steps: int, repeats: int, at: int, progress: bool) -> list[dict]:
    """GPT-2 124M, random weights: bytes at the full context, decode step at ``at`` tokens."""
    model = load_model("gpt2", seed=0)
    c = model.cfg
    ids = torch.randint(0, c.vocab_size, (1, at), generator=torch.Generator().manual_seed(0))
    full = c.n_layers * layer_bytes({"cache": "prealloc"}, c.n_heads, c.context_length,
                                    c.head_dim)
    rows = []
    for label, opts in tqdm(GPT2_CONFIGS.items(), desc="gpt2", disable=not progress):
        nbytes = c.n_layers * layer_bytes(opts, c.n_heads, c.context_length, c.head_dim)
        rows.append({"label": label, "options": opts, "nbytes": nbytes, "bytes_ratio":
                     nbytes / full, "step_ms": step_ms(model, ids, opts, steps, repeats)})
    return rows


def _held_bytes(obj) -> int:
    """Bytes of the tensors inside a quantized tensor (quanto's QTensor, hqq's pair)."""
    if isinstance(obj, (tuple, list)):
        return sum(_held_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_held_bytes(o) for o in obj.values())
    if not isinstance(obj, torch.Tensor):
        return 0
    if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
        names, _ = obj.__tensor_flatten__()
        return sum(_held_bytes(getattr(obj, n)) for n in names)
    return obj.numel() * obj.element_size()


@torch.inference_mode()
def hf_rows(model, rows: torch.Tensor, ref_top1: torch.Tensor, group_size: int, residual: int,
            steps: int) -> tuple[list[dict], str]:
    """transformers' QuantizedCache on the same weights and windows, for each backend that
    imports; and a line saying which ran and why others did not."""
    try:
        from transformers.cache_utils import QuantizedCache as HFQuantizedCache

        from ..hf.llama import to_hf_model
    except ImportError as err:
        return [], f"transformers' QuantizedCache is not available: {err}"
    backends, missing = {}, []
    from importlib.metadata import version

    for name, module, dist in (("quanto", "optimum.quanto", "optimum-quanto"),
                               ("hqq", "hqq", "hqq")):
        try:
            __import__(module)
            backends[name] = f"{dist} {version(dist)}"
        except Exception as err:  # noqa: BLE001 - any import failure means: not measured
            missing.append(f"{name} ({type(err).__name__}: {err})")
    hf = to_hf_model(model)
    out = []
    for label, args in HF_RUNS.items():
        if args["backend"] not in backends:
            continue
        make = partial(HFQuantizedCache, config=hf.config, q_group_size=group_size,
                       residual_length=residual, **args)
        try:
            nll, top1, nbytes, _ = _hf_stream(hf, rows, make, steps)
            ms = _hf_stream(hf, rows[:1], make, steps)[3]  # one sequence, as kvlib's step_ms
        except Exception as err:  # noqa: BLE001 - a backend that fails is reported, not fatal
            missing.append(f"{label} ({type(err).__name__}: {str(err)[:120]})")
            continue
        out.append({"label": label, "options": {**args, "q_group_size": group_size,
                                                "residual_length": residual},
                    "perplexity": float(nll.mean().exp()),
                    "agreement": float((top1.reshape(-1) == ref_top1).float().mean()),
                    "nbytes": nbytes, "step_ms": ms})
    import transformers

    parts = [f"transformers {transformers.__version__}"]
    if backends:
        parts[0] += (", " + ", ".join(backends.values()) + " (installed with pip from the "
                     "package index, CPU wheels; optional, not kvlib requirements)")
    parts.append("ran: " + (", ".join(h["label"] for h in out) if out else "none"))
    if missing:
        parts.append("not run: " + "; ".join(missing))
    note = "; ".join(parts)
    return out, note


def _hf_stream(hf, rows: torch.Tensor, make, steps: int
               ) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Teacher-forced streaming through a transformers model with the cache ``make()``: losses,
    argmaxes, bytes the cache holds per sequence at the end (quantized part + residual), and
    the median decode step (ms) over the last ``steps`` positions."""
    B, T = rows.shape
    cache = make()
    nll = torch.empty(B, T - 1)
    top1 = torch.empty(B, T - 1, dtype=torch.long)
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = hf(rows[:, :1], past_key_values=cache, use_cache=True).logits[:, -1]
        for t in range(1, T):
            nll[:, t - 1] = F.cross_entropy(logits.float(), rows[:, t], reduction="none")
            top1[:, t - 1] = logits.argmax(-1)
            if t < T - 1:
                with Stopwatch() as sw:
                    logits = hf(rows[:, t : t + 1], past_key_values=cache,
                                use_cache=True).logits[:, -1]
                times.append(sw.seconds)
    nbytes = sum(_held_bytes((getattr(layer, "_quantized_keys", None),
                              getattr(layer, "_quantized_values", None),
                              getattr(layer, "keys", None), getattr(layer, "values", None)))
                 for layer in cache.layers)
    return nll, top1, nbytes // B, median_ms(times[-steps:])


def compress(model_name: str = "mini-llama", windows: int = 16, steps: int = 64,
             repeats: int = 3, gpt2: bool = True, gpt2_at: int = 512, gpt2_steps: int = 16,
             hf: bool = True, progress: bool = True) -> dict:
    """Measure; see the module docstring."""
    model = load_model(model_name)
    ctx = model.cfg.context_length
    text = held_out(model_name)[0]
    windows = min(windows, text.numel() // ctx)
    rows = text[: windows * ctx].view(windows, ctx)  # (windows, ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        points = measure_frontier(model, rows, CONFIGS)
    caches = []
    for p in tqdm(points, desc="compress", disable=not progress):
        caches.append({"label": p.label, "family": p.family, "options": p.options,
                       "nbytes": p.nbytes, "bytes_ratio": p.bytes_ratio,
                       "perplexity": p.perplexity, "perplexity_ratio": p.perplexity
                       / p.full_perplexity, "agreement": p.agreement,
                       "step_ms": step_ms(model, rows[:1], p.options, steps, repeats)})
    d = {"kind": "compress", "model": model_name, "context_length": ctx, "windows": windows,
         "tokens_scored": windows * (ctx - 1), "steps": steps, "repeats": repeats,
         "residual": RESIDUAL, "threads": torch.get_num_threads(), "dtype": "float32",
         "device": "cpu", "environment": environment_info(), "caches": caches}
    if hf:
        ref = next(p for p in points if p.family == "full")
        ref_top1 = perplexity(model, rows, **ref.options).top1
        d["hf"], d["hf_note"] = hf_rows(model, rows, ref_top1, 32, RESIDUAL, steps)
    if gpt2:
        d["gpt2"] = gpt2_rows(gpt2_steps, repeats, gpt2_at, progress)
        d["gpt2_at"] = gpt2_at
    d["targets"] = compress_targets(caches)
    return d


def compress_targets(caches: list[dict]) -> list[dict]:
    """Bytes at the full context (no residual) and perplexity against full precision."""
    by = {c["label"]: c for c in caches}
    r = f" + residual {RESIDUAL}"
    return [
        target_row("int8_bytes", "int8 bytes at the full context / fp32 (scales included)",
                   by["int8"]["bytes_ratio"]),
        target_row("int4_bytes", "int4 bytes at the full context / fp32 (scales included)",
                   by["int4"]["bytes_ratio"]),
        target_row("int8_ppl", "int8 perplexity / fp32's", by["int8"]["perplexity_ratio"]),
        target_row("int4_ppl", f"int4{r} perplexity / fp32's", by[f"int4{r}"]["perplexity_ratio"]),
    ]


def compress_lines(d: dict) -> list[str]:
    """The Markdown section of a compress run."""
    env = d["environment"]
    ctx = d["context_length"]
    lines = [
        "## Compressing the cache (quantized keys and values, eviction)", "",
        f"`{d['model']}` (context {ctx}), {d['dtype']} on {d['device']}, {d['threads']} "
        f"threads, {env.get('cpu_model', '?')}, torch {env.get('torch', '?')}, load average "
        f"{env.get('load_avg', [float('nan')])[0]:.2f} at the start. The held-out text cut into "
        f"{d['windows']} windows of {ctx} tokens ({d['tokens_scored']:,} tokens scored), each "
        "streamed token by token through the cache. Bytes: held per sequence after the full "
        "context, read from the caches (scales, zero points, positions and scores included). "
        "Agreement: positions whose argmax (the greedy token) equals the fp32 cache's. Step: the "
        f"median decode step over the last {d['steps']} positions of a window, {d['repeats']} "
        f"passes. Quantized: group size 32, scales and zero points in float16. Evict: 4 sinks, "
        f"half the rest a recent window. Command: "
        f"`{d.get('command', 'python -m kvlib.bench compress')}`", "",
        "| cache | KiB held | / fp32 | perplexity | / fp32 | agreement | step ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in d["caches"]:
        lines.append(f"| {c['label']} | {c['nbytes'] / 1024:,.0f} | {c['bytes_ratio']:.3f} | "
                     f"{c['perplexity']:.3f} | {c['perplexity_ratio']:.4f} | "
                     f"{c['agreement']:.1%} | {c['step_ms']:.2f} |")
    lines += ["", "| target | value | limit | met |", "|---|---:|---:|---|"]
    for t in d["targets"]:
        met = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['value']:.4f}x | {t['op']} {t['limit']} | {met} |")
    if d["targets"][0]["met"] is False:
        lines += ["", "int8 at group size 32 holds 1 byte per value plus a float16 scale and "
                  "zero point per 32 values (4 / 32 = 0.125 bytes): 1.125 / 4 = 0.281 of fp32. "
                  "mini-llama's head_dim is 32, so values cannot be grouped more coarsely; "
                  "GPT-2 124M (head_dim 64, group 64) below reaches 1.0625 / 4 = 0.266."]
    if "hf" in d:
        lines += ["", f"transformers' `QuantizedCache` on the same weights and windows (group "
                  f"32, residual_length {d['residual']}): {d['hf_note']}. It quantizes keys "
                  "and values along the same axis and, each time its residual fills, "
                  "dequantizes and quantizes the whole cache again.", ""]
        if d["hf"]:
            lines += ["| cache | KiB held | perplexity | / fp32 | agreement | step ms |",
                      "|---|---:|---:|---:|---:|---:|"]
            full = d["caches"][0]["perplexity"]
            for h in d["hf"]:
                lines.append(f"| {h['label']} | {h['nbytes'] / 1024:,.0f} | "
                             f"{h['perplexity']:.3f} | {h['perplexity'] / full:.4f} | "
                             f"{h['agreement']:.1%} | {h['step_ms']:.2f} |")
    if "gpt2" in d:
        lines += ["", f"GPT-2 124M, random weights (the real shape: 12 layers, 12 heads, head_dim "
                  f"64), bytes at its full context (1,024 tokens), decode step at "
                  f"{d['gpt2_at']} tokens; quantized with group size 64:", "",
                  "| cache | MiB held | / fp32 | step ms |", "|---|---:|---:|---:|"]
        for g in d["gpt2"]:
            lines.append(f"| {g['label']} | {g['nbytes'] / 2**20:,.1f} | {g['bytes_ratio']:.3f} "
                         f"| {g['step_ms']:.2f} |")
    return lines
