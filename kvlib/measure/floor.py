"""The weight-streaming floor: decoding one token must read every weight matrix once, so a bare
chain of matrix-vector products over the model's own matrices is as fast as a decode step can be;
"floor + KV" adds one attention read of a cache of ``kv_len`` tokens per layer.

It works for any ``kvlib.CausalLM``: the matrices are the model's ``nn.Linear`` layers in module
order (GPT-2's fused ``c_attn``, ``c_proj``, ``c_fc``, ``c_proj``; Llama's ``q_proj`` ...
``down_proj``), the output head last and once (tied to the embedding or not), and the keys and
values have the shape the model's own caches give them (fewer key/value heads than query heads
under grouped-query attention). ``step_against_floor`` times a model's decode step next to its
floor, for a chapter (the benchmarks' lockstep does the same, step by step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..generate import generate
from ..models import CausalLM
from ..state import preserved_state
from ..timing import Stopwatch
from .stats import median

Mats = list[tuple[Tensor, Tensor | None]]  # (weight, bias) of each matrix, in reading order


def _linears(model: CausalLM) -> list[nn.Linear]:
    """The model's linear layers in module order, the output head moved last."""
    head = getattr(model, "lm_head", None)
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    return found + ([head] if isinstance(head, nn.Linear) else [])


def floor_weights(model: CausalLM) -> Mats:
    """Every matrix a decode step must read, in order, with its bias: each linear layer of each
    block, then the output head (for GPT-2, the token embedding: tied, read once)."""
    mats, seen = [], set()
    for lin in _linears(model):
        if id(lin.weight) not in seen:
            seen.add(id(lin.weight))
            mats.append((lin.weight, lin.bias))
    return mats


def attention_points(model: CausalLM) -> dict[int, int]:
    """Where the chain reads each layer's keys and values: the index in ``floor_weights`` of the
    attention layer's first matrix (GPT-2's ``c_attn``, Llama's ``q_proj``) -> the layer."""
    index = {id(w): j for j, (w, _) in enumerate(floor_weights(model))}
    points = {}
    for i, layer in enumerate(model.attention_layers):
        first = next((m for m in layer.modules() if isinstance(m, nn.Linear)), None)
        if first is None:
            raise ValueError(f"attention layer {i} holds no nn.Linear: the floor cannot place "
                             "its key/value read")
        points[index[id(first.weight)]] = i
    return points


def floor_nbytes(model: CausalLM) -> int:
    """Bytes the floor reads: every tensor of ``floor_weights`` once."""
    sizes = {}
    for w, b in floor_weights(model):
        for t in (w, b):
            if t is not None:
                sizes[t.data_ptr()] = t.numel() * t.element_size()
    return sum(sizes.values())


def _fit(x: Tensor, width: int) -> Tensor:
    """``x`` ``(B, n)`` cut (or, when narrower, repeated) to ``width`` columns."""
    if x.shape[1] < width:
        x = x.repeat(1, -(-width // x.shape[1]))
    return x[:, :width]


@dataclass
class FloorChain:
    """The floor of one model: its matrices, where each layer's keys and values are read, and
    the number of query heads."""

    mats: Mats
    attend_at: dict[int, int]  # index in mats -> the layer whose keys and values are read after
    n_heads: int

    @classmethod
    def of(cls, model: CausalLM) -> FloorChain:
        return cls(floor_weights(model), attention_points(model), model.cfg.n_heads)


def floor_step(chain: FloorChain, x: Tensor, kv: list[tuple[Tensor, Tensor]] | None = None
               ) -> Tensor:
    """A chain of matrix-vector products over ``chain.mats`` starting from ``x`` ``(B, C)``: each
    output (cut to the next matrix's input width) feeds the next, so none can be skipped. With
    ``kv`` (per layer ``(B, H_kv, L, D)`` keys and values), each layer's query also attends over
    its keys and values once: the floor of a decode step at sequence length L."""
    H = chain.n_heads
    for j, (w, b) in enumerate(chain.mats):
        x = F.linear(_fit(x, w.shape[1]), w, b)  # (B, out)
        layer = chain.attend_at.get(j) if kv is not None else None
        if layer is not None:
            k, v = kv[layer]
            B, D = x.shape[0], k.shape[-1]
            q = _fit(x, H * D).reshape(B, H, 1, D)  # (B, H, 1, D)
            x = F.scaled_dot_product_attention(  # reads K and V once
                q, k, v, enable_gqa=k.shape[1] != H).reshape(B, H * D)
    return x


def cache_shapes(model: CausalLM) -> list[tuple[int, int]]:
    """``(H_kv, D)`` of each layer's keys, as the model's caches store them (its layer specs)."""
    return [(spec.n_kv_heads, spec.head_dim) for spec in model.layer_specs()]


class Floor:
    """Times ``floor_step`` on a model's own weights, for a batch size and a KV length."""

    def __init__(self, model: CausalLM, batch: int, kv_len: int = 0) -> None:
        p = next(model.parameters())
        self.chain, self.device, self.kv_len = FloorChain.of(model), p.device, kv_len
        self.x = torch.randn(batch, self.chain.mats[0][0].shape[1], dtype=p.dtype,
                             device=p.device)
        self.kv = None if kv_len == 0 else [
            tuple(torch.randn(batch, heads, kv_len, dim, dtype=p.dtype, device=p.device)
                  for _ in "kv") for heads, dim in cache_shapes(model)]
        self.kv_nbytes = 0 if self.kv is None else sum(
            t.numel() * t.element_size() for kv in self.kv for t in kv)
        self.times: list[float] = []  # seconds of each step measured

    @torch.inference_mode()
    def step_seconds(self) -> float:
        """One floor step, timed."""
        with Stopwatch(self.device) as sw:
            floor_step(self.chain, self.x, self.kv)
        return sw.seconds

    def measure(self, n: int) -> None:
        """Time ``n`` more steps into ``times``."""
        self.times += [self.step_seconds() for _ in range(n)]

    def warm_up(self, n: int = 3) -> None:
        """Run ``n`` untimed steps."""
        for _ in range(n):
            self.step_seconds()


def step_against_floor(model: CausalLM, new: int, rounds: int = 3, prompt: int = 16) -> dict:
    """A decode step and the floor of the same model, taking turns: ``rounds`` times, a
    ``generate`` of ``new`` tokens after a random ``prompt`` (prealloc cache, batch 1), then as
    many floor steps; round 0 warms up. The medians in ms, and the share of a step that is not
    reading weights (``beyond``: ``1 - floor / step``). The model is handed back as it was."""
    if rounds < 2 or new < 1:
        raise ValueError(f"rounds must be >= 2 (round 0 warms up) and new >= 1, got {rounds} "
                         f"and {new}")
    p = next(model.parameters())
    ids = torch.randint(0, model.cfg.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(0)).to(p.device)
    floor = Floor(model, 1)  # every weight matrix of the model read once, nothing else
    steps, floors = [], []
    with preserved_state(model):
        for r in range(rounds):
            out = generate(model, ids, new, cache="prealloc")
            floor.times = []
            floor.measure(new)
            if r:
                steps.append(median(out.step_times) * 1e3)
                floors.append(median(floor.times) * 1e3)
    step_ms, floor_ms = median(steps), median(floors)
    return {"step_ms": step_ms, "floor_ms": floor_ms, "beyond": 1 - floor_ms / step_ms}
