"""The weight-streaming floor: decoding one token must read every weight matrix once, so a bare
chain of matrix-vector products over the model's own matrices is as fast as a decode step can be;
"floor + KV" adds one attention read of a cache of ``kv_len`` tokens per layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import GPTModel
from ..timing import Stopwatch

Mats = list[tuple[Tensor, Tensor | None]]  # (weight, bias) of each matrix, in reading order


def floor_weights(model: GPTModel) -> Mats:
    """Every matrix a decode step must read, in order: per block c_attn, c_proj, c_fc, c_proj
    (with their biases), then the output head, which is the token embedding (tied: read once)."""
    mats = []
    for block in model.h:
        for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            mats.append((lin.weight, lin.bias))
    mats.append((model.lm_head.weight, None))
    return mats


def floor_nbytes(model: GPTModel) -> int:
    """Bytes the floor reads: every tensor of ``floor_weights`` once."""
    sizes = {}
    for w, b in floor_weights(model):
        for t in (w, b):
            if t is not None:
                sizes[t.data_ptr()] = t.numel() * t.element_size()
    return sum(sizes.values())


def floor_step(mats: Mats, x: Tensor, kv: list[tuple[Tensor, Tensor]] | None = None,
               n_heads: int = 1) -> Tensor:
    """A chain of matrix-vector products over ``mats`` starting from ``x`` ``(B, C)``: each
    output (cut to the next matrix's input width) feeds the next, so none can be skipped. With
    ``kv`` (per layer ``(B, H, L, D)`` keys and values), each layer's query also attends over its
    keys and values once: the floor of a decode step at sequence length L."""
    for j, (w, b) in enumerate(mats):
        x = F.linear(x[:, : w.shape[1]], w, b)  # (B, out)
        if kv is not None and j % 4 == 0 and j // 4 < len(kv):  # after a layer's c_attn
            k, v = kv[j // 4]
            B, C = x.shape[0], w.shape[1]
            q = x[:, :C].reshape(B, n_heads, 1, C // n_heads)  # (B, H, 1, D)
            x = F.scaled_dot_product_attention(q, k, v).reshape(B, C)  # reads K and V once
    return x


class Floor:
    """Times ``floor_step`` on a model's own weights, for a batch size and a KV length."""

    def __init__(self, model: GPTModel, batch: int, kv_len: int = 0) -> None:
        cfg, p = model.cfg, next(model.parameters())
        self.mats, self.n_heads, self.device = floor_weights(model), cfg.n_heads, p.device
        self.x = torch.randn(batch, cfg.emb_dim, dtype=p.dtype, device=p.device)
        shape = (batch, cfg.n_heads, kv_len, cfg.head_dim)
        self.kv = None if kv_len == 0 else [
            (torch.randn(shape, dtype=p.dtype, device=p.device),
             torch.randn(shape, dtype=p.dtype, device=p.device)) for _ in range(cfg.n_layers)]
        self.kv_len = kv_len
        self.kv_nbytes = 0 if self.kv is None else sum(
            k.numel() * k.element_size() * 2 for k, _ in self.kv)
        self.times: list[float] = []  # seconds of each step measured

    @torch.inference_mode()
    def step_seconds(self) -> float:
        """One floor step, timed."""
        with Stopwatch(self.device) as sw:
            floor_step(self.mats, self.x, self.kv, self.n_heads)
        return sw.seconds

    def measure(self, n: int) -> None:
        """Time ``n`` more steps into ``times``."""
        self.times += [self.step_seconds() for _ in range(n)]

    def warm_up(self, n: int = 3) -> None:
        """Run ``n`` untimed steps."""
        for _ in range(n):
            self.step_seconds()
