"""``python -m kvlib.bench latent``: latent attention's decode step, naive against absorbed,
at several context lengths (``kvlib.measure.attention_modes``: the two modes in turn, medians).

The model is random, with DeepSeek-V3's attention at a small size (16 heads, latent 128 + 16),
so a step is mostly attention: naive decompresses every cached latent into 16 heads' keys and
values each step; absorbed reads the latents as they are.
"""

from __future__ import annotations

import torch

from ..machine import environment_info
from ..measure import attention_modes
from ..models import DeepseekConfig, DeepseekModel

WIDE = DeepseekConfig(vocab_size=1024, context_length=4096, emb_dim=256, n_heads=16,
                      n_layers=2, ffn_dim=512, q_lora_rank=96, kv_lora_rank=128,
                      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def latent(contexts: tuple[int, ...] = (64, 256, 1024, 2048), steps: int = 16,
           repeats: int = 5, warmup: int = 1, cfg: DeepseekConfig = WIDE) -> dict:
    """Median decode step of each mode after ``context`` cached tokens, and their tokens."""
    torch.manual_seed(0)
    model = DeepseekModel(cfg).eval()
    rows = []
    for n in contexts:
        ids = torch.randint(0, cfg.vocab_size, (1, n + steps))
        t = attention_modes(model, ids, first=n, repeats=repeats, warmup=warmup)
        rows.append({"context": n, "naive_ms": t["naive"].median_ms,
                     "absorb_ms": t["absorb"].median_ms, "same_tokens": t["same_tokens"],
                     "cache_bytes": t["cache_bytes"]})
    return {"kind": "latent", "config": {k: getattr(cfg, k) for k in (
        "emb_dim", "n_heads", "n_layers", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
        "v_head_dim")}, "steps": steps, "repeats": repeats, "warmup": warmup, "rows": rows,
        "environment": environment_info()}


def latent_lines(d: dict) -> list[str]:
    c, e = d["config"], d["environment"]
    lines = ["## Latent attention: naive against absorbed decoding", "",
             f"A random DeepSeek-V3-style model ({c['n_layers']} layers, {c['n_heads']} heads, "
             f"latent {c['kv_lora_rank']} + {c['qk_rope_head_dim']}), float32, batch 1; the "
             f"median of {d['repeats']} passes of {d['steps']} steps per mode, the modes in "
             f"turn; {e['cpu_model']}, {e['threads']} thread(s), load {e['load_avg'][0]:.1f}.",
             "", "| cached tokens | naive ms/step | absorbed ms/step | naive / absorbed | same "
             "tokens | cache bytes |", "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['context']} | {r['naive_ms']:.2f} | {r['absorb_ms']:.2f} | "
                     f"{r['naive_ms'] / r['absorb_ms']:.2f}x | {r['same_tokens']} | "
                     f"{r['cache_bytes']:,} |")
    return lines
