"""Beam search on shared blocks: the choice of the next beams, and their block tables.

A beam search of ``k`` beams keeps the ``k`` hypotheses with the highest cumulative
log-probability. Every step each beam proposes every token; the best ``k`` candidates among all
``k * vocab`` survive, and a surviving candidate may continue any beam, so one beam can have
several children while another has none. With a contiguous cache per beam, that means copying
caches around (transformers' ``reorder_cache`` gathers every layer's keys and values by the
chosen beams, every step). On a paged cache it means copying block *tables*: a row that now
continues beam ``p`` takes ``p``'s table, every block shared (a reference more), and gives its
own back. Nothing is copied until a row writes into a block it shares: copy-on-write copies that
one block, the last partly filled one; the blocks before it stay shared for good, so the prompt
and the hypotheses' common start are stored once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pool import BlockPool
from .request import Request


def select_beams(logits: Tensor, scores: Tensor, num_beams: int
                 ) -> tuple[list[int], list[int], list[float]]:
    """One step of beam search, the way transformers' ``generate(num_beams=k, do_sample=False)``
    does it when no token ends a beam (no eos).

    ``logits`` ``(B, vocab)`` are the next-token logits of the ``B`` live beams (1 at the first
    step: only the prompt's, so the first step expands beam 0 alone), ``scores`` ``(B,)`` their
    cumulative log-probabilities. Returns, best first, each new beam's parent row, its token and
    its score: every candidate ``score[b] + log p(token | beam b)`` (``B * vocab`` of them,
    beam-major), the top ``2k`` by ``torch.topk`` (transformers keeps ``2k`` in case some end in
    eos), then the top ``k`` of those (none ends here, so they are the first ``k``; ties go
    as ``torch.topk`` breaks them)."""
    B, V = logits.shape
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, V), float32 as transformers
    total = (log_probs + scores.to(log_probs)[:, None]).view(-1)  # (B * V,) candidates
    top, index = torch.topk(total, min(2 * num_beams, total.numel()))  # (2k,) best first
    keep = torch.topk(top, num_beams).indices  # (k,) the beams that live on
    chosen = index[keep]
    return (chosen // V).tolist(), (chosen % V).tolist(), top[keep].tolist()


def continue_beams(pool: BlockPool, rows: list[Request], parents: list[int],
                   tokens: list[int], scores: list[float]) -> None:
    """Row ``i`` of a beam search now holds the hypothesis of row ``parents[i]`` followed by
    ``tokens[i]``: it takes a copy of that row's block table, sharing every block (one more
    reference each), and gives its own blocks back (one reference fewer each; a block no row
    holds any more is free). Shares come before releases, so a kept block never passes through
    the free list. No keys or values move here."""
    tables = [list(rows[p].blocks) for p in parents]
    outputs = [rows[p].output + [t] for p, t in zip(parents, tokens, strict=True)]
    for table in tables:
        for b in table:
            pool.share(b)
    for r in rows:
        for b in r.blocks:
            pool.release(b)
    for r, table, out, s in zip(rows, tables, outputs, scores, strict=True):
        r.blocks, r.output, r.score = table, out, s
