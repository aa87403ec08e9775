"""Speculative decoding: a cheap draft proposes ``k`` tokens, the model checks them all in one
forward pass, and the caches roll back to the last token it agrees with.

    kvlib.generate(model, ids, 100, cache="prealloc", draft="lookup", draft_tokens=4)
    kvlib.generate(model, ids, 100, cache="prealloc", draft=small_model, draft_tokens=4)

A round, with ``L`` tokens committed of which the model's caches hold all but the last:

1. the draft proposes ``d_1 .. d_k`` (a small model with the same vocabulary, decoding from
   its own caches; or ``"lookup"``: the tokens that followed the last earlier occurrence of the
   text's final n-gram, no model at all, as transformers' ``prompt_lookup_num_tokens``);
2. the model runs the last committed token and the ``k`` drafts in one forward: ``k + 1``
   predictions, the first for ``d_1``, the last for the token after ``d_k``;
3. greedy: the drafts are kept while each is the model's own argmax; then the model's token at
   the first disagreement (or after ``d_k``) comes for free. Sampling: draft ``d_i`` is kept
   with probability ``min(1, p(d_i) / q(d_i))`` (``p`` the model's distribution, ``q`` the
   draft's; a point mass for lookup), and at the first rejection the token is drawn from
   ``max(0, p - q)``, renormalised: the rule of Leviathan et al. and Chen et al. (2023), which
   gives exactly the model's distribution;
4. every cache crops to the tokens kept (``crop``, see ``kvlib.caches``): the model's keep the
   ``L + n`` committed, the draft's what it had fed of them.

So greedy speculative decoding writes the very tokens of plain decoding, only in fewer forward
passes of the model when the draft guesses well. A batch's rows each accept their own number of
drafts; every row advances by the smallest (plus its own next token), which stays exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .caches import strategy
from .models import CausalLM
from .sampling import greedy, sample, warp
from .timing import Stopwatch

MAX_NGRAM = 3  # prompt lookup tries the last 3 tokens, then 2, then 1


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: greedy at temperature 0; ``generator`` seeds the draws."""

    temperature: float = 0.0
    top_k: int | None = None
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: Tensor) -> Tensor:
        return warp(logits, self.temperature, self.top_k)


class PromptLookup:
    """The draft with no model: the tokens that followed the most recent earlier occurrence of
    the text's last ``n``-gram (``n`` from ``MAX_NGRAM`` down to 1). Strong where text repeats
    itself, as code does (names, signatures, whole lines)."""

    def __init__(self, pad: Tensor | None = None, max_ngram: int = MAX_NGRAM) -> None:
        self.pad, self.max_ngram = pad, max_ngram

    def propose(self, seq: Tensor, L: int, k: int, how: Sampling) -> tuple[Tensor, None]:
        """Drafts ``(B, k')`` for ``seq[:, :L]``, ``k' <= k`` the fewest any row found."""
        rows = []
        for b in range(seq.shape[0]):
            start = 0 if self.pad is None else int(self.pad[b])
            rows.append(self._row(seq[b, start:L], k))
        n = min(len(r) for r in rows)
        return torch.stack([r[:n] for r in rows]), None

    def _row(self, text: Tensor, k: int) -> Tensor:
        L = text.shape[0]
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            windows = text[: L - 1].unfold(0, n, 1)  # (L - n, n): every earlier n-gram
            hits = (windows == text[L - n :]).all(dim=1).nonzero()[:, 0]
            if len(hits):
                after = int(hits[-1]) + n  # the most recent occurrence's next token
                return text[after : after + k]
        return text[:0]

    def crop(self, n: int) -> None:
        """Nothing to roll back: the lookup reads the committed text."""


class DraftModel:
    """A small model with the same vocabulary, decoding ahead from its own caches (of the
    model's strategy, or the default growing one when the model caches nothing); ``crop`` rolls
    them back with the model's."""

    def __init__(self, draft: CausalLM, name: str, max_len: int, window: int | None,
                 pad: Tensor | None, options: dict) -> None:
        self.model = draft
        if strategy(name).traits.keeps_tokens:
            draft.set_kv_cache(name, max_len=max_len, window=window, **options)
        else:
            draft.set_kv_cache()
        draft.set_padding(pad)

    def propose(self, seq: Tensor, L: int, k: int, how: Sampling
                ) -> tuple[Tensor, Tensor | None]:
        """Drafts ``(B, k)`` after ``seq[:, :L]`` and, when sampling, the draft's distributions
        ``(B, k, vocab)`` they were drawn from."""
        if k == 0:
            return seq[:, :0], None
        m, tokens, probs = self.model, [], []
        new = seq[:, m.pos : L]  # what the draft has not seen yet (at least the last token)
        for _ in range(k):
            logits = m(new, use_cache=True, last_only=True, check_ids=False)[:, -1]  # (B, V)
            if how.greedy:
                new = greedy(logits)
            else:
                probs.append(how.probs(logits))
                new = torch.multinomial(probs[-1], 1, generator=how.generator)
            tokens.append(new)
        return torch.cat(tokens, dim=1), (torch.stack(probs, dim=1) if probs else None)

    def crop(self, n: int) -> None:
        if self.model.pos > n:
            self.model.crop_kv_cache(n)


def verify(model: CausalLM, seq: Tensor, L: int, drafts: Tensor) -> Tensor:
    """The model's logits ``(B, k + 1, vocab)`` for the drafts ``(B, k)`` after ``seq[:, :L]``:
    one forward over the last committed token and the drafts (the caches hold the rest), or,
    with nothing cached, over everything."""
    x = torch.cat([seq[:, :L], drafts], dim=1)
    k = drafts.shape[1]
    if not model.caches[0].traits.keeps_tokens:
        model.reset_kv_cache()
        return model(x, use_cache=True, check_ids=False)[:, -(k + 1):]
    return model(x[:, L - 1 :], use_cache=True, check_ids=False)  # (B, k + 1, V)


def accept(logits: Tensor, drafts: Tensor, q: Tensor | None, how: Sampling
           ) -> tuple[int, Tensor, Tensor]:
    """How many drafts every row keeps (the fewest any row accepted), each row's token after
    them ``(B,)``, and each row's own number accepted ``(B,)``.

    ``logits`` ``(B, k + 1, V)``: the model's predictions for ``d_1 .. d_k`` and the token after;
    ``q`` ``(B, k, V)``: the draft's distributions (None: the drafts were certain, a lookup's or
    a greedy draft's)."""
    B, k = drafts.shape
    if how.greedy:
        best = greedy(logits)[..., 0]  # (B, k + 1)
        kept = (best[:, :k] == drafts).int().cumprod(dim=1).sum(dim=1)  # (B,)
        n = int(kept.min()) if B else 0
        return n, best[:, n], kept
    p = how.probs(logits)  # (B, k + 1, V)
    if q is None:  # a certain draft: q is one-hot at d_i
        q = torch.zeros_like(p[:, :k]).scatter_(2, drafts[..., None], 1.0)
    p_d = p[:, :k].gather(2, drafts[..., None])[..., 0]  # (B, k)
    q_d = q.gather(2, drafts[..., None])[..., 0]
    u = torch.rand(B, k, generator=how.generator, device=logits.device)
    kept = (u * q_d < p_d).int().cumprod(dim=1).sum(dim=1)  # (B,): accept while u < p / q
    n = int(kept.min()) if B else 0
    if n == k:  # every row kept every draft: the bonus token, from the model's last prediction
        return n, torch.multinomial(p[:, k], 1, generator=how.generator)[:, 0], kept
    residual = (p[:, n] - q[:, n]).clamp(min=0)  # (B, V)
    empty = residual.sum(dim=-1, keepdim=True) == 0  # p == q there: never rejected, but be safe
    residual = torch.where(empty, p[:, n], residual)
    drawn = torch.multinomial(residual, 1, generator=how.generator)[:, 0]
    return n, torch.where(kept > n, drafts[:, n], drawn), kept


@dataclass
class Round:
    """One verification: the tokens it commits ``(B, n + 1)``, its wall time, drafts checked."""

    tokens: Tensor
    seconds: float
    drafted: int
    accepted: int


def speculate(model: CausalLM, idx: Tensor, max_new_tokens: int, draft: PromptLookup | DraftModel,
              k: int, how: Sampling) -> Iterator[Round]:
    """The rounds of speculative decoding after the prompt ``idx`` ``(B, T)`` (the model's
    caches set, and empty); the first round is the prefill's token, with nothing drafted."""
    B, T = idx.shape
    seq = idx.new_empty(B, T + max_new_tokens)  # prompt + new tokens, written in place
    seq[:, :T] = idx
    with Stopwatch(idx.device) as sw:
        model.reset_kv_cache()
        first = sample(model(idx, use_cache=True, last_only=True)[:, -1], how.temperature,
                       how.top_k, how.generator)  # (B, 1)
    seq[:, T] = first[:, 0]
    yield Round(first, sw.seconds, 0, 0)
    L = T + 1  # committed tokens; the model's caches hold all but the last
    while L < T + max_new_tokens:
        with Stopwatch(idx.device) as sw:
            drafts, q = draft.propose(seq, L, min(k, T + max_new_tokens - L - 1), how)
            n, nxt, _ = accept(verify(model, seq, L, drafts), drafts, q, how)
            seq[:, L : L + n] = drafts[:, :n]
            seq[:, L + n] = nxt
            if model.caches[0].traits.keeps_tokens:
                model.crop_kv_cache(L + n)  # committed: L + n + 1, the newest not yet run
            draft.crop(L + n)
        yield Round(seq[:, L : L + n + 1], sw.seconds, drafts.shape[1], n)
        L += n + 1


def check_draft(model: CausalLM, draft: CausalLM | str, k: int, cache: str) -> None:
    """Clear errors for a draft or a cache that speculative decoding cannot use."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"draft_tokens must be a whole number of tokens, at least 1, got {k!r}")
    if isinstance(draft, str):
        if draft != "lookup":
            raise ValueError(f"draft must be a model with the same vocabulary or 'lookup' "
                             f"(prompt lookup), got {draft!r}")
    elif not isinstance(draft, CausalLM):
        raise TypeError(f"draft must be a kvlib model or 'lookup', got {type(draft).__name__}")
    elif draft is model:
        raise ValueError("the draft is the model itself: both need caches of their own. Load "
                         "a second copy (kvlib.load_model) or use a smaller model")
    elif draft.cfg.vocab_size != model.cfg.vocab_size or (
            getattr(draft, "tokenizer", None) is not None
            and getattr(model, "tokenizer", None) is not None
            and getattr(draft.tokenizer, "gpt2_ids", None)
            != getattr(model.tokenizer, "gpt2_ids", None)):
        raise ValueError(
            f"the draft's vocabulary ({draft.cfg.vocab_size} ids) is not the model's "
            f"({model.cfg.vocab_size}): its tokens would mean other text. Use a draft trained "
            "with the same tokenizer, or draft='lookup'")
    traits = strategy(cache).traits
    if traits.recomputes_window or traits.one_token_when_full or not traits.rolls_back:
        # (a cache that takes one token at a time once full has moved or dropped the oldest)
        raise ValueError(
            f"speculative decoding rolls the cache back after every rejected draft, and the "
            f"{cache!r} cache cannot (see its crop): use 'prealloc', 'concat', 'bf16', 'paged', "
            "'sliding' (it keeps draft_tokens extra slots to roll back) or None")
