"""How well a model predicts a text: the loss of every next token, and perplexity.

    result = kvlib.perplexity(model, ids)                        # one forward over the text
    result = kvlib.perplexity(model, ids, cache="sliding", window=64)   # token by token
    result.nll          # (tokens - 1,) the negative log-likelihood of each next token, in nats
    result.perplexity   # exp(mean nll)
    result.top1         # (tokens - 1,) the token the model ranked first at each step

With a cache the text is streamed as generation would see it: the first token is prefilled, then
every later token is decoded one at a time, and the logits before each token score it. So a cache
that changes what attention sees (a sliding window) shows up in the numbers, and one that should
change nothing can be checked to change nothing. ``cache=None`` means full attention
(recomputation): by default one forward pass over the whole text, which gives the same losses as
streaming with recomputation (``stream=True``), only much faster.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .caches import strategy
from .generate import decode_one, prefill
from .loading import TRAINED, TRAINED_DIR
from .models import CausalLM, check_token_ids
from .state import preserved_state

SLICE_FILE = "test_slice.json"  # held-out windows beside each trained model: the card's score
LONG_FILE = "test_long.json"  # one long held-out stretch: streaming and forgetting
SLICE_FORMAT = "kvlib held-out windows 1"


def windows_sha256(windows: Tensor) -> str:
    """A fingerprint of scored token windows, to check that two evaluations read the same."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()


def load_test_slice(path: str | Path) -> Tensor:
    """Held-out windows ``(n, T)`` as the training script saved them, checked against their
    fingerprint."""
    data = json.loads(Path(path).read_text())
    windows = torch.tensor(data["windows"], dtype=torch.long)
    if data.get("format") != SLICE_FORMAT or windows_sha256(windows) != data["sha256"]:
        raise ValueError(f"{path}: not an intact kvlib held-out slice")
    return windows


def held_out(name: str = "mini-llama", long: bool = True) -> Tensor:
    """Text the trained model ``name`` never saw, as its token ids: ``long`` gives one stretch
    ``(1, 4096)`` of a single file of the test split, else the card's windows ``(64, 256)``."""
    if name not in TRAINED:
        raise ValueError(f"held-out text comes with the trained models {list(TRAINED)}, "
                         f"not {name!r}")
    path = TRAINED_DIR / name / (LONG_FILE if long else SLICE_FILE)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train the model (python -m kvlib.train "
                                f"--model {name} --steps N), or write it with python -m "
                                "kvlib.train --long-text")
    return load_test_slice(path)


@dataclass
class Perplexity:
    """The losses of one evaluation: ``nll`` per predicted token, in order (row after row for a
    batch), float32, natural log."""

    nll: Tensor  # (N,)
    cache: str = "none"
    window: int | None = None
    top1: Tensor | None = None  # (N,) the argmax of each prediction (greedy agreement)

    @property
    def tokens(self) -> int:
        """How many tokens were predicted (the first token of each row is not)."""
        return self.nll.numel()

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def perplexity(self) -> float:
        """``exp(mean nll)``: as if the model chose among that many tokens at each step."""
        return math.exp(self.mean_nll)

    def __repr__(self) -> str:
        return (f"Perplexity({self.perplexity:.3f} over {self.tokens} tokens, "
                f"cache={self.cache!r}, window={self.window})")


def _as_rows(ids: Sequence[int] | Tensor, model: CausalLM) -> Tensor:
    """``ids`` as a ``(B, T)`` long tensor on the model's device, ``T >= 2``."""
    device = next(model.parameters()).device
    rows = torch.as_tensor(ids, dtype=torch.long, device=device)
    if rows.dim() == 1:
        rows = rows[None]
    check_token_ids(rows, model.cfg.vocab_size)
    if rows.shape[1] < 2:
        raise ValueError("perplexity needs at least two tokens: the first one predicts nothing")
    return rows


def _token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token loss in float32: logits ``(..., vocab)``, targets ``(...)``."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none")


@torch.inference_mode()
def perplexity(model: CausalLM, ids: Sequence[int] | Tensor, cache: str | None = None,
               window: int | None = None, stream: bool = False, batch_size: int = 8,
               **cache_options) -> Perplexity:
    """Score every next token of ``ids`` (a list, a ``(T,)`` or a ``(B, T)`` tensor).

    ``cache``: None (full attention, recomputed; ``window`` masks it to the same span as a
    sliding cache), "concat", "prealloc", "sliding" (needs ``window``), "sinks" (``window`` and
    ``n_sink``), "recompute" (``window``), "bf16", "quantized" (``bits``, ``group_size``,
    ``residual``) or "evict" (``budget``, ``n_sink``, ``window``); ``cache_options`` go to
    ``model.set_kv_cache``. With
    a cache, or ``stream=True``, the text is fed token by token through ``prefill`` and
    ``decode_one``, as ``generate`` feeds it; otherwise one forward pass per ``batch_size`` rows
    (for "recompute": ``8 * batch_size`` windows per pass, the same losses as streaming). The
    model is evaluated in eval mode and handed back as it was
    (caches, position counter, training flags).
    """
    rows = _as_rows(ids, model)
    name = "none" if cache is None else cache
    traits = strategy(name).traits  # nothing kept: every loss comes from one pass (or a window's)
    with preserved_state(model):
        model.eval()
        top1 = torch.empty(rows.shape[0], rows.shape[1] - 1, dtype=torch.long,
                           device=rows.device)  # (B, T - 1)
        if not traits.keeps_tokens and not traits.recomputes_window and not stream:
            nll = torch.cat([_one_forward(model, rows[i : i + batch_size], window,
                                          top1[i : i + batch_size])
                             for i in range(0, rows.shape[0], batch_size)])
        elif traits.recomputes_window and not stream:
            nll = torch.stack([_recomputed(model, row, window, 8 * batch_size) for row in rows])
            top1 = None
        else:
            model.set_kv_cache(name, max_len=rows.shape[1], window=window, **cache_options)
            nll = _streamed(model, rows, top1)
    return Perplexity(nll.reshape(-1).cpu(), name, window,
                      None if top1 is None else top1.reshape(-1).cpu())


def _one_forward(model: CausalLM, rows: Tensor, window: int | None, top1: Tensor) -> Tensor:
    """``(B, T - 1)`` losses from one forward over ``rows`` (full attention, or a window); the
    argmax of each prediction goes to ``top1``."""
    model.set_kv_cache("none", window=window)
    logits = model(rows, use_cache=True)  # positions 0 .. T-1, causal, masked to the window
    top1.copy_(logits[:, :-1].argmax(dim=-1))
    return _token_nll(logits[:, :-1], rows[:, 1:]).view(rows.shape[0], -1)


def _recomputed(model: CausalLM, row: Tensor, window: int | None, batch_size: int) -> Tensor:
    """``(T - 1,)`` losses of recomputing the last ``window`` tokens for every prediction, as
    the "recompute" cache does step by step, with many windows in one forward pass: the
    prediction of token ``t + 1`` is the last position of tokens ``max(0, t - window + 1) .. t``
    run from position 0."""
    if window is None:
        raise ValueError("the 'recompute' cache needs a window, e.g. window=256")
    T = row.shape[0]
    model.set_kv_cache("none")
    out = []
    first = min(window, T - 1)  # predictions 0 .. first-1 see the text from its start
    logits = model(row[None, :first])[0]  # (first, vocab): causal, so each row is a prefix
    out.append(_token_nll(logits, row[1 : first + 1]))
    ends = torch.arange(first, T - 1, device=row.device)  # windows ending at token t
    for chunk in ends.split(batch_size) if len(ends) else ():
        idx = chunk[:, None] - window + 1 + torch.arange(window, device=row.device)  # (n, W)
        logits = model(row[idx], last_only=True)[:, -1]  # (n, vocab): the window's last position
        out.append(_token_nll(logits, row[chunk + 1]))
    return torch.cat(out)


def _streamed(model: CausalLM, rows: Tensor, top1: Tensor) -> Tensor:
    """``(B, T - 1)`` losses, feeding one token at a time through the model's caches; the argmax
    of each prediction goes to ``top1``."""
    B, T = rows.shape
    nll = torch.empty(B, T - 1, device=rows.device)
    logits = prefill(model, rows[:, :1])  # (B, vocab): the prediction of token 1
    for t in range(1, T):
        nll[:, t - 1] = _token_nll(logits, rows[:, t])
        top1[:, t - 1] = logits.argmax(dim=-1)
        if t < T - 1:
            logits = decode_one(model, rows[:, : t + 1])
    return nll


@torch.inference_mode()
def attention_to_first(model: CausalLM, ids: Tensor, n_first: int = 4,
                       skip: int | None = None) -> Tensor:
    """How much attention goes to the first tokens: ``(layers, heads)``, the softmax weight that
    queries at positions ``skip ..`` (default ``4 * n_first``, so the first tokens are not simply
    near) put on keys ``0 .. n_first-1``, averaged over those queries. Full attention over ``ids``
    ``(B, T)``, no cache; the model's caches are left as they were."""
    skip = 4 * n_first if skip is None else skip
    if ids.shape[1] <= skip:
        raise ValueError(f"need more than skip={skip} tokens, got {ids.shape[1]}")
    layers, mass = [layer.self_attn for layer in model.layers], []

    def record(module, args, output):
        w = module.attention_weights(*args[:3])  # (B, H, T, T)
        mass.append(w[:, :, skip:, :n_first].sum(-1).mean(dim=(0, 2)))  # (H,)

    with preserved_state(model):
        hooks = [a.register_forward_hook(record) for a in layers]
        try:
            model(ids)
        finally:
            for h in hooks:
                h.remove()
    return torch.stack(mass).float().cpu()  # (layers, heads)


def first_token_attention(model: CausalLM, ids: torch.Tensor, skip: int = 4) -> torch.Tensor:
    """``(layers, heads)``: the softmax weight that queries at positions ``skip ..`` put on
    position 0, averaged over them (``kvlib.attention_to_first`` for RoPE models; GPT-2's from
    its fused projection)."""
    layers = model.attention_layers
    if hasattr(layers[0], "attention_weights"):
        return attention_to_first(model, ids, n_first=1, skip=skip)
    mass = []

    def record(module, args, output):
        B, T, _ = args[0].shape
        q, k, _ = module.c_attn(args[0]).view(B, T, 3, module.n_heads, -1).permute(
            2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        w = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        mass.append(w[:, :, skip:, 0].mean(dim=(0, 2)))

    hooks = [layer.register_forward_hook(record) for layer in layers]
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(mass).float().cpu()
