"""What a trained model writes, beyond its perplexity: does its code parse?

``parse_share`` continues 20 function headers of the held-out test split greedily and asks
Python's own parser whether the function it wrote is valid code: the card reports the share,
for the shipped models and the ones they replaced. A continuation is cut where the function
ends (the first line back at the header's indentation) or, if it runs to the token limit, before
its last line, which is usually cut mid-way.
"""

from __future__ import annotations

import ast
import re

import numpy as np
import torch

from ..evaluate import perplexity
from ..generate import generate
from ..models import CausalLM
from .data import TokenData

N_HEADERS = 20
HEADER_TOKENS = 96  # tokens of body written after each header
HEADER = re.compile(r"^[ \t]*def \w+\([^()\n]*\)( -> [^:\n]+)?:[ \t]*$", re.M)


def function_headers(data: TokenData, n: int = N_HEADERS) -> list[str]:
    """``n`` one-line ``def`` headers of the test split, evenly spread over it, dedented (all
    of them if it has no more)."""
    text = data.tokenizer.decode(data.ids["test"].tolist())
    found = [m.group(0).strip() for m in HEADER.finditer(text)]
    if len(found) <= n:  # a small corpus (the tests'): every one it has
        return found
    picks = np.linspace(0, len(found) - 1, n).round().astype(int)
    return [found[i] for i in picks]


def function_written(header: str, completion: str) -> str:
    """The function a continuation writes: up to its first line back at the header's level, or
    without its last line if it never gets there."""
    lines = completion.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and not line[0].isspace():
            return header + "\n" + "\n".join(lines[:i])
    return header + "\n" + "\n".join(lines[:-1])


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def parse_share(model: CausalLM, data: TokenData, bos: bool) -> dict:
    """Greedy continuations of ``function_headers``: the share whose function parses, and each
    one (header, completion, parses)."""
    tok, rows = data.tokenizer, []
    for header in function_headers(data):
        ids = torch.tensor([[tok.eot_id] * bos + tok.encode(header + "\n")])
        n = min(HEADER_TOKENS, model.cfg.context_length - ids.shape[1])
        if n <= 0:  # a tiny test model's context: no room for a body
            continue
        new = generate(model, ids, n, cache="prealloc").tokens[0, ids.shape[1]:]
        completion = tok.decode(new.tolist())
        rows.append({"header": header, "completion": completion,
                     "parses": parses(function_written(header, completion))})
    share = sum(r["parses"] for r in rows) / len(rows) if rows else None
    return {"headers": len(rows), "share": share,
            "new_tokens": HEADER_TOKENS, "rows": rows}


def slice_perplexity(model: CausalLM, windows: torch.Tensor, bos_id: int | None) -> float:
    """Perplexity on held-out ``windows`` ``(n, T)``, every token after each window's first
    predicted from the ones before it; a model trained with a start token (``bos_id``) gets one
    before each window, which changes the context but not the tokens scored, so two models with
    and without it are compared on the same predictions."""
    if bos_id is None:
        return perplexity(model, windows, batch_size=16).perplexity
    rows = torch.cat([torch.full_like(windows[:, :1], bos_id), windows], dim=1)
    nll = perplexity(model, rows, batch_size=16).nll.view(rows.shape[0], -1)[:, 1:]
    return float(nll.mean().exp())


def compare_with(model: CausalLM, bos: bool, previous: CausalLM, previous_bos: bool,
                 windows: torch.Tensor, data: TokenData) -> dict:
    """The shipped ``model`` against the ``previous`` one it replaced, on the previous card's
    test slice (``windows``) and on the function headers."""
    eot = data.tokenizer.eot_id
    return {"windows": list(windows.shape),
            "perplexity": slice_perplexity(model, windows, eot if bos else None),
            "previous_perplexity": slice_perplexity(previous, windows,
                                                    eot if previous_bos else None),
            "previous_parses": parse_share(previous, data, previous_bos)["share"]}
