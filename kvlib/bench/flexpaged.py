"""``python -m kvlib.bench flexpaged``: attention that reads blocks where they lie, against the
gather ``kvlib.PagedCache`` does.

``PagedCache.update`` copies a batch's blocks into one tensor per layer and step, then runs the
fused ``scaled_dot_product_attention`` with the engine's mask; for a decode step,
``PagedCache.attend_in_place`` runs kvlib's own kernel (``paged_attention.c``), which reads each
block where it lies, timed here too where it can be built. PyTorch's FlexAttention reads keys
through a block mask instead, and its experimental ``PagedAttention`` helper
(``torch.nn.attention.experimental``) turns a block table into such a mask: no copy, but a
kernel that ``torch.compile`` must generate (on a CPU, inductor's C++ template). This times one
layer's decode attention both ways on a model's shape (``batch`` rows of ``length`` cached
tokens, blocks of ``block_size``), in turns, after a warm-up, and checks that both give the same
output. The block mask is built once, outside the timer: a server would rebuild it as its rows
grow, which only adds to FlexAttention's side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..machine import environment_info
from ..measure import median
from ..timing import Stopwatch
from .serving import random_model


def _paged_inputs(B: int, H_kv: int, H: int, D: int, L: int, bs: int) -> dict:
    """Random keys and values of ``B`` rows of ``L`` tokens in both layouts, and a query."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(B, H_kv, L, D, generator=g) for _ in range(2))
    per = -(-L // bs)  # blocks per row
    # kvlib's storage (N, bs, H_kv, D), row b in blocks b*per .. b*per + per - 1
    K, V = (F.pad(t.transpose(1, 2), (0, 0, 0, 0, 0, per * bs - L)).reshape(B * per, bs, H_kv, D)
            for t in (keys, values))
    slot = torch.arange(per * bs)
    # FlexAttention's layout (1, H_kv, N * bs, D) and its page table
    pages = PagedAttention(B * per, bs, B, device="cpu")
    for b in range(B):
        pages.reserve(torch.tensor(b), torch.tensor(L))
    k_cache, v_cache = (torch.zeros(1, H_kv, B * per * bs, D) for _ in range(2))
    pages.assign(torch.arange(B), torch.arange(L)[None].expand(B, L), keys, values, k_cache,
                 v_cache)
    lengths = torch.full((B,), L)
    logical = create_block_mask(lambda b, h, q, kv: kv < lengths[b], B, None, 1, per * bs,
                                device="cpu", BLOCK_SIZE=bs)
    return {"q": torch.randn(B, H, 1, D, generator=g), "keys": keys, "values": values,
            "K": K, "V": V,
            "rows": torch.arange(B * per),
            "mask": (slot < L).view(1, 1, 1, -1).expand(B, 1, 1, -1),  # the engine's mask
            "k_cache": k_cache, "v_cache": v_cache,
            "block_mask": pages.convert_logical_block_mask(logical)}


def _kernel(x: dict) -> torch.Tensor | None:
    """``PagedCache``'s decode step: ``paged_attention.c`` reads the blocks where they lie (None
    where it cannot be built)."""
    from ..caches.paged_kernel import decode_kernel

    q, K, B = x["q"], x["K"], x["q"].shape[0]
    kernel = decode_kernel(q, K[:B, :1].transpose(1, 2))
    if kernel is None:
        return None
    tables, lengths = x["rows"].view(B, -1), x["mask"][:, 0, 0].sum(-1)
    return lambda: kernel(q, K, x["V"], tables, lengths)


def _gather(x: dict, H_kv: int) -> torch.Tensor:
    """``PagedCache``'s way: the blocks into one tensor, then the fused attention."""
    q, K, V = x["q"], x["K"], x["V"]
    B, H, _, D = q.shape
    k = K.index_select(0, x["rows"]).view(B, -1, H_kv, D).transpose(1, 2)  # (B, H_kv, S, D)
    v = V.index_select(0, x["rows"]).view(B, -1, H_kv, D).transpose(1, 2)
    y = F.scaled_dot_product_attention(q.view(B, H_kv, H // H_kv, D), k, v, attn_mask=x["mask"])
    return y.view(B, H, 1, D)


@torch.inference_mode()
def flex_paged(model_name: str = "mini-llama", batch: int = 8, length: int = 240,
               block_size: int = 16, rounds: int = 200) -> dict:
    """Measure; see the module docstring."""
    from torch.nn.attention.flex_attention import flex_attention

    cfg = random_model(model_name).cfg
    H, H_kv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = _paged_inputs(batch, H_kv, H, D, length, block_size)
    flex = torch.compile(flex_attention)

    def paged() -> torch.Tensor:
        return flex(x["q"], x["k_cache"], x["v_cache"], block_mask=x["block_mask"],
                    enable_gqa=True)

    with Stopwatch() as sw:
        out = paged()  # compiles
    want = _gather(x, H_kv)
    diff = (out - want).abs().max().item()
    ways = {"gather": lambda: _gather(x, H_kv), "flex": paged}
    kernel = _kernel(x)
    if kernel is not None:
        ways["kernel"] = kernel
        kernel_diff = (kernel() - want).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(rounds + 10):  # in turns; the first 10 of each are the warm-up
        for name, f in ways.items():
            with Stopwatch() as one:
                f()
            if i >= 10:
                times[name].append(one.seconds)
    us = {f"{name}_us": 1e6 * median(t) for name, t in times.items()}
    return {"kind": "flexpaged", "model": model_name, "batch": batch, "length": length,
            "block_size": block_size, "heads": H, "kv_heads": H_kv, "head_dim": D,
            "rounds": rounds, "threads": torch.get_num_threads(), "compile_s": sw.seconds,
            **us, "max_abs_diff": diff,
            "kernel_max_abs_diff": kernel_diff if kernel is not None else None,
            "environment": environment_info()}


def flex_paged_lines(d: dict) -> list[str]:
    """The Markdown section of a flexpaged run."""
    env = d["environment"]
    kernel = d.get("kernel_us")
    fastest = min(("gather", "flex") + (("kernel",) if kernel else ()), key=lambda k: d[f"{k}_us"])
    names = {"gather": "the gather", "flex": "FlexAttention", "kernel": "the kernel"}
    rows = [f"| gather + `scaled_dot_product_attention` (`PagedCache.update`) | "
            f"{d['gather_us']:.1f} |",
            f"| FlexAttention + `PagedAttention`, compiled | {d['flex_us']:.1f} |"]
    if kernel:
        rows.append(f"| `paged_attention.c`, blocks read where they lie "
                    f"(`PagedCache.attend_in_place`) | {kernel:.1f} |")
    ratios = f"FlexAttention / gather: {d['flex_us'] / d['gather_us']:.2f}x"
    if kernel:
        ratios += (f"; kernel / gather: {kernel / d['gather_us']:.2f}x (outputs within "
                   f"{d['kernel_max_abs_diff']:.1e})")
    return [
        "## Paged attention: the gather, FlexAttention's block table, kvlib's kernel", "",
        f"One layer's decode attention on `{d['model']}`'s shape ({d['heads']} query heads, "
        f"{d['kv_heads']} key/value heads of {d['head_dim']}), {d['batch']} rows of "
        f"{d['length']} cached tokens in blocks of {d['block_size']}, float32, {d['threads']} "
        f"threads, {env.get('cpu_model', '?')}, torch {env.get('torch', '?')}; medians of "
        f"{d['rounds']} turns each after 10. FlexAttention compiled in {d['compile_s']:.1f} s; "
        f"its output and the gather's differ by at most {d['max_abs_diff']:.1e}. "
        f"Command: `{d.get('command', 'python -m kvlib.bench flexpaged')}`", "",
        "| way | µs per layer and step |", "|---|---:|", *rows, "",
        f"{ratios}. Fastest here: {names[fastest]}.", ""]
