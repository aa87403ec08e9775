"""Where a decode step's time goes beyond the weight reads: the per-step overhead of a twin model
whose arithmetic is negligible, the same step as bare functional calls with kinds of small ops
left out (``floor_gap``), and whether ``torch.compile`` pays (``compile_check``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..aot import AotDecoder, check_aot
from ..generate import decode_one, prefill
from ..loading import load_model
from ..machine import environment_info
from ..measure.floor import Floor, floor_step
from ..measure.stats import median_ms, summary
from ..models import PRESETS, CausalLM, GPTModel, LlamaModel, build_model
from ..timing import Stopwatch
from .gap import LLAMA_GAP_PARTS, functional_llama_step, fused_weights, llama_ops_per_step
from .plan import DTYPES, HF_KINDS, PROMPT
from .runners import HFRunner, KvlibRunner, hf_twin, time_run, weight_sharing_copy

GAP_PARTS = ("layernorm", "gelu", "attention", "residual")  # small ops between weight reads


def narrow_twin(name: str, dtype: str, device: str) -> GPTModel:
    """A twin of preset ``name`` with the same layers and heads but 4-wide heads and a 256-token
    vocabulary, where arithmetic costs next to nothing."""
    cfg = PRESETS[name]
    torch.manual_seed(0)
    twin = build_model(replace(cfg, emb_dim=4 * cfg.n_heads, vocab_size=256))
    return twin.to(device=device, dtype=DTYPES[dtype]).eval()


def twin_step_ms(twin: GPTModel, window: int, new_tokens: int) -> dict[str, float]:
    """Median decode step of the twin with each cache (and transformers' when installed), over
    two rounds after a warm-up round."""
    idx = torch.tensor([[1, 2, 3, 4, 5, 6]], device=next(twin.parameters()).device)
    runners = {s: KvlibRunner(twin, s, window) for s in ("concat", "prealloc", "sliding")}
    try:
        hf = hf_twin(twin)
        runners.update({k: HFRunner(hf, k) for k in HF_KINDS})
    except ImportError:
        pass
    steps: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(3):
        for k, runner in runners.items():
            run = time_run(runner, idx, new_tokens)
            if r:  # the first round is a warm-up
                steps[k] += run["steps"]
    return {k: median_ms(v) for k, v in steps.items()}


def functional_step(model: GPTModel, tok: Tensor, kv_len: int,
                    drop: frozenset[str] = frozenset()) -> Tensor:
    """A prealloc decode step of ``model`` as bare functional calls over its own weights: no
    modules, no checks, 2-D activations. The new token (position ``kv_len``) is written into slot
    ``kv_len`` of each layer's cache and attends over the ``kv_len`` tokens before it; the caches'
    counters do not move. ``drop`` leaves out kinds of small ops between the weight reads
    ("layernorm", "gelu", "attention": the cache write and attention, "residual": the adds), to
    measure what each costs; with nothing dropped the logits ``(B, vocab)`` equal ``decode_one``'s.
    """
    cfg = model.cfg
    H, D, C = cfg.n_heads, cfg.head_dim, cfg.emb_dim
    ln = "layernorm" not in drop

    def norm(x: Tensor, m: torch.nn.LayerNorm) -> Tensor:
        return F.layer_norm(x, (C,), m.weight, m.bias, m.eps) if ln else x

    x = model.wte.weight[tok[:, 0]] + model.wpe.weight[kv_len]  # (B, C)
    for block in model.h:
        attn, mlp, cache = block.attn, block.mlp, block.attn.kv_cache
        qkv = F.linear(norm(x, block.ln_1), attn.c_attn.weight, attn.c_attn.bias)  # (B, 3C)
        if "attention" in drop:
            y = qkv[:, :C]
        else:
            q, k, v = qkv.view(-1, 3, H, 1, D).unbind(1)  # 3 x (B, H, 1, D)
            cache.keys[:, :, kv_len : kv_len + 1] = k
            cache.values[:, :, kv_len : kv_len + 1] = v
            y = F.scaled_dot_product_attention(q, cache.keys[:, :, : kv_len + 1],
                                               cache.values[:, :, : kv_len + 1]).view(-1, C)
        y = F.linear(y, attn.c_proj.weight, attn.c_proj.bias)
        x = y if "residual" in drop else x + y
        h = F.linear(norm(x, block.ln_2), mlp.c_fc.weight, mlp.c_fc.bias)  # (B, 4C)
        if "gelu" not in drop:
            h = F.gelu(h, approximate="tanh")
        y = F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)
        x = y if "residual" in drop else x + y
    return F.linear(norm(x, model.ln_f), model.lm_head.weight)  # (B, vocab)


def gap_variants(model: CausalLM, tok: Tensor, kv_len: int) -> dict[str, Callable[[], Tensor]]:
    """The steps ``floor_gap`` times, by name: kvlib's, the bare one, the bare one without each
    kind of small op, the matrix products alone and, for a Llama, the bare one with fused
    projections."""
    llama = isinstance(model, LlamaModel)
    step, parts = (functional_llama_step, LLAMA_GAP_PARTS) if llama else (functional_step,
                                                                        GAP_PARTS)

    def bare(drop: frozenset[str] = frozenset()) -> Callable[[], Tensor]:
        return lambda: step(model, tok, kv_len, drop)

    out = {"kvlib step (modules)": lambda: decode_one(model, tok),
           "bare functional step": bare(),
           **{f"without {part}": bare(frozenset({part})) for part in parts},
           "matrix products only": bare(frozenset(parts))}
    if llama:
        fused = fused_weights(model)
        out["bare, q/k/v and gate/up fused"] = lambda: step(model, tok, kv_len, fused=fused)
    return out


def ops_per_step(model: CausalLM) -> dict[str, int]:
    """How many small ops of each left-out kind a decode step runs."""
    if isinstance(model, LlamaModel):
        return llama_ops_per_step(model)
    n = model.cfg.n_layers
    return {"layernorm": 2 * n + 1, "gelu": n, "attention": n, "residual": 2 * n}


def floor_gap(model: CausalLM, kv_len: int = 100, rounds: int = 100) -> dict:
    """Where a decode step's time above the floor goes, measured on the real model (GPT-2 or
    Llama family).

    In turn, each round: kvlib's step (``decode_one``, prealloc, ``kv_len`` cached tokens), the same
    step as bare functional calls (``functional_step``, ``functional_llama_step``), that step
    without each kind of small op, with only its matrix products left, and the floor. Medians
    over the rounds; the order rotates. A small op between two weight reads finds its code and
    data evicted by megabytes of weights, so it costs far more here than in a loop of its own."""
    p = next(model.parameters())
    tok = torch.tensor([PROMPT[:1]], device=p.device)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, kv_len), generator=gen).to(p.device)
    model.set_kv_cache("prealloc", max_len=kv_len + 1)
    floor = Floor(model, 1)
    with torch.inference_mode():
        prefill(model, prompt)  # fills the caches with kv_len real tokens
        variants = gap_variants(model, tok, kv_len)
        same = torch.allclose(variants["kvlib step (modules)"](),
                              variants["bare functional step"](), atol=1e-4)
        variants["floor"] = lambda: floor_step(floor.chain, floor.x)
        # kvlib's step adds a token to the caches: each round starts from the prompt again
        times = in_turns(variants, rounds, p.device, before_round=lambda: prefill(model, prompt))
    return {"kv_len": kv_len, "rounds": rounds, "ms": {k: median_ms(v) for k, v in times.items()},
            "same_logits": same, "ops_per_step": ops_per_step(model),
            "threads": torch.get_num_threads(), "environment": environment_info("cpu")}


def in_turns(calls: dict[str, Callable[[], object]], rounds: int, device: torch.device,
             before_round: Callable[[], object], warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each call, once a round, in an order that rotates by one every round; the first
    ``warmup`` rounds are not kept. ``before_round`` runs, untimed, at the start of each round."""
    names = list(calls)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds + warmup):
        before_round()
        for name in names[r % len(names):] + names[: r % len(names)]:
            with Stopwatch(device) as sw:
                calls[name]()
            if r >= warmup:
                times[name].append(sw.seconds)
    return times


def compile_check(preset: str = "gpt2", n: int = 100, rounds: int = 2) -> dict:
    """Does ``torch.compile`` pay for the preallocated cache's decode step on this machine?

    The same model run eagerly and through ``kvlib.compiling.compiled`` (what
    ``generate(..., compile=True)`` runs: ``torch.compile(model)`` with the caches'
    counters symbolic), prefill eager, ``n - 1`` greedy decode steps each; the first compiled
    run includes the compilation. Rounds alternate eager and compiled, and for a model
    ``kvlib.aot`` compiles, its ahead-of-time step too (``aot_s``: the making of it)."""
    from ..compiling import compiled as compile_model
    from ..compiling import compiling

    model = load_model(preset, seed=123, dtype=torch.float32, device="cpu")
    compiled = compile_model(model)
    idx = torch.tensor([PROMPT])

    def run(forward) -> tuple[list[float], list[int]]:
        model.set_kv_cache("prealloc", max_len=len(PROMPT) + n)
        times, tokens = [], []
        with torch.inference_mode():
            tok = model(idx, use_cache=True, last_only=True)[:, -1].argmax(-1, keepdim=True)
            for _ in range(n - 1):
                with Stopwatch("cpu") as sw:
                    logits = forward(tok, use_cache=True, last_only=True)
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                times.append(sw.seconds)
                tokens.append(int(tok[0, 0]))
        return times, tokens

    run(model)  # warm-up
    with compiling():
        with Stopwatch("cpu") as first:
            _, first_tokens = run(compiled)
        eager, comp = [], []
        for _ in range(rounds):
            times, ref = run(model)
            eager += times
            times, tokens = run(compiled)
            comp += times
    return {"model": preset, "new_tokens": n, "threads": torch.get_num_threads(),
            "first_run_s": first.seconds, "eager_step_ms": summary([1e3 * t for t in eager]),
            "compiled_step_ms": summary([1e3 * t for t in comp]),
            "same_tokens": tokens == ref and first_tokens == ref,
            **aot_check(model, idx, n, ref), "environment": environment_info("cpu")}


def aot_check(model: CausalLM, idx: Tensor, n: int, ref: list[int]) -> dict:
    """``AotDecoder``'s making and ``n - 1`` decode steps of it (on a copy of ``model``), for
    ``compile_check``, against the eager decode steps' tokens ``ref``; nothing for a model it
    does not compile."""
    try:
        check_aot(model, idx.shape[1] + n)
    except (TypeError, ValueError):
        return {}
    decoder = AotDecoder(weight_sharing_copy(model), idx.shape[1] + n)
    decoder.generate(idx, n)  # a warm-up
    tokens, seconds = decoder.generate(idx, n)
    return {"aot_s": decoder.compile_s, "aot_step_ms": summary([1e3 * t for t in seconds]),
            "aot_same_tokens": tokens[0, idx.shape[1] + 1:].tolist() == ref}
