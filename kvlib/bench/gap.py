"""A Llama-family decode step as bare functional calls, for ``floor_gap``: the same step as
``kvlib.models.llama`` (RMSNorm, RoPE, grouped-query attention, SwiGLU) over the model's own
weights and caches, with kinds of small ops left out, and with the projections that read the
same input fused into one matrix each (q, k, v; gate and up) to measure what fusing would save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.llama import LlamaModel
from ..rotary import apply_rope

LLAMA_GAP_PARTS = ("rmsnorm", "rope", "attention", "swiglu", "residual")


def llama_ops_per_step(model: LlamaModel) -> dict[str, int]:
    """How many ops of each kind a decode step runs (per kind of ``LLAMA_GAP_PARTS``)."""
    n, qk = model.cfg.n_layers, model.cfg.qk_norm
    return {"rmsnorm": 2 * n + 1 + (2 * n if qk else 0), "rope": 2 * n, "attention": n,
            "swiglu": n, "residual": 2 * n}


def fused_weights(model: LlamaModel) -> list[tuple[Tensor, Tensor]]:
    """Per layer, ``(q; k; v)`` and ``(gate; up)`` stacked into one ``(out, in)`` matrix each,
    laid out as ``arrange_weights`` lays out the model's own."""
    def stack(*ws: Tensor) -> Tensor:
        w = torch.cat([w.detach() for w in ws])
        return w.t().contiguous().t() if ws[0].stride(0) == 1 else w  # transposed, as theirs

    return [(stack(b.self_attn.q_proj.weight, b.self_attn.k_proj.weight,
                   b.self_attn.v_proj.weight),
             stack(b.mlp.gate_proj.weight, b.mlp.up_proj.weight)) for b in model.layers]


def functional_llama_step(model: LlamaModel, tok: Tensor, kv_len: int,
                          drop: frozenset[str] = frozenset(),
                          fused: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """A prealloc decode step of ``model`` as bare functional calls: the new token (position
    ``kv_len``) is written into slot ``kv_len`` of each layer's cache and attends over the slots
    before it; the counters do not move. ``drop`` leaves out kinds of ``LLAMA_GAP_PARTS``;
    ``fused`` (``fused_weights``) reads q, k, v and gate, up as one matrix each. With nothing
    dropped the logits ``(B, vocab)`` are ``decode_one``'s (float rounding aside)."""
    cfg = model.cfg
    if cfg.attn_sinks:
        raise ValueError("functional_llama_step writes plain attention; a model with learned "
                         "sinks (gpt-oss) is not covered")
    H, Hk, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def norm(x: Tensor, m) -> Tensor:  # (..., dim)
        return x if "rmsnorm" in drop else F.rms_norm(x, (x.shape[-1],), m.weight, m.eps)

    x = model.embed_tokens.weight[tok[:, 0]]  # (B, C)
    B = x.shape[0]
    cos, sin = model.rope(kv_len, 1, like=x)  # (1, D)
    for i, layer in enumerate(model.layers):
        a, mlp, cache = layer.self_attn, layer.mlp, layer.self_attn.kv_cache
        h = norm(x, layer.input_layernorm)
        if fused is None:
            q, k, v = (F.linear(h, p.weight) for p in (a.q_proj, a.k_proj, a.v_proj))
        else:
            q, k, v = F.linear(h, fused[i][0]).split([H * D, Hk * D, Hk * D], dim=-1)
        q, k, v = q.view(B, H, D), k.view(B, Hk, D), v.view(B, Hk, D)
        if "attention" in drop:
            y = q.reshape(B, H * D)
        else:
            if a.q_norm is not None:  # Qwen3
                q, k = norm(q, a.q_norm), norm(k, a.k_norm)
            if "rope" not in drop:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            cache.keys[:, :, kv_len] = k  # (B, Hk, D) into slot kv_len
            cache.values[:, :, kv_len] = v
            y = F.scaled_dot_product_attention(  # the group's queries as rows, per kv head
                q.view(B, Hk, H // Hk, D), cache.keys[:, :, : kv_len + 1],
                cache.values[:, :, : kv_len + 1]).reshape(B, H * D)
        y = F.linear(y, a.o_proj.weight)
        x = y if "residual" in drop else x + y
        h = norm(x, layer.post_attention_layernorm)
        if fused is None:
            g, u = F.linear(h, mlp.gate_proj.weight), F.linear(h, mlp.up_proj.weight)
        else:
            g, u = F.linear(h, fused[i][1]).chunk(2, dim=-1)
        h = g if "swiglu" in drop else F.silu(g) * u
        y = F.linear(h, mlp.down_proj.weight)
        x = y if "residual" in drop else x + y
    return F.linear(norm(x, model.norm), model.lm_head.weight)  # (B, vocab)
