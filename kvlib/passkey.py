"""The passkey test: a value bound near the top of a Python file and used far below it.

    r = kvlib.recall(model, distance=200)                                 # full attention
    r = kvlib.recall(model, cache="sliding", window=128, distance=200)    # the binding out of view
    r.accuracy, r.without_binding, r.chance

An episode is real code with two lines put in::

    PORT = 48213              <- the binding, at the start of a line after ``prefix`` tokens of code
    ...                       <- filler: the code that followed, token for token
    assert PORT == 48213      <- the use; the answer is the tokens after ``==``: the value, newline

The value is a 5-digit number drawn at random, so the answer's tokens can be predicted from the
binding and from nothing else. ``distance`` is counted in tokens, from the value's first token in
the binding to the answer's first token: the answer's ``j``-th token is predicted at a query
``distance - 1`` tokens after the binding's ``j``-th, so a sliding window of ``W`` tokens still
holds the whole binding while the answer is predicted exactly when ``distance <= W``. The filler
never crosses a file (no ``<|endoftext|>`` inside an episode).

Training episodes (``Passkeys.training_row``, mixed into the batches by ``kvlib.train``) draw
their values from seven eighths of the 5-digit numbers and their code from the train split;
held-out episodes (``Passkeys.held_out``, what ``recall`` scores) draw from the other eighth
(``is_held_out``, a hash) and from the test split. A model that never sees the binding guesses:
``chance`` is one in 90,000, and ``without_binding`` measures it, on the same episodes with the
binding line replaced by the code that followed the prefix.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .caches import strategy
from .corpus import Corpus
from .evaluate import perplexity
from .models import CausalLM
from .tokenizer import Tokenizer, tokenizer_for

NAMES = ("KEY", "SEED", "PORT", "MAGIC", "LIMIT", "TOKEN", "OFFSET", "BUFSIZE", "TIMEOUT",
         "VERSION", "CHECKSUM", "MAX_ITEMS", "DEFAULT_ID", "SECRET", "PASSKEY", "CODE")
LOW, HIGH = 10_000, 100_000  # the values: every 5-digit number
N_VALUES = HIGH - LOW
MAX_VALUE_TOKENS = 6  # " 48213" is at most a space and five digits, whatever the vocabulary
PLACEMENT_TRIES = 1000


def is_held_out(value: int) -> bool:
    """Whether ``value`` belongs to the held-out eighth (a multiplicative hash's top 3 bits)."""
    return (value * 2654435761) % 2**32 >> 29 == 0


@dataclass(frozen=True)
class Episode:
    """One episode's tokens and where its parts are (indices into ``ids``)."""

    ids: np.ndarray  # int64
    name: str
    value: int
    binding: int  # the value's first token in the binding line
    answer: int  # the answer's first token (the answer: the value's tokens and a newline)
    answer_len: int
    bound: bool = True  # False: the binding line is replaced by code (the chance baseline)

    @property
    def distance(self) -> int:
        return self.answer - self.binding


@dataclass(frozen=True)
class Code:
    """Token ids of real code, with where its lines start and its files end."""

    ids: np.ndarray  # int64
    line_starts: np.ndarray  # indices i where a line starts (0, or ids[i - 1] ends with "\n")
    ends: np.ndarray  # indices of <|endoftext|>


class Passkeys:
    """Episodes for one tokenizer: ``training_row`` (a training window), ``held_out`` (what
    ``recall`` scores); ``code(ids)`` prepares the code they are cut from."""

    def __init__(self, tokenizer: Tokenizer, names: Sequence[str] = NAMES) -> None:
        self.tokenizer, self.names = tokenizer, tuple(names)
        self._values: dict[int, tuple[int, ...]] = {}
        self.eot = tokenizer.eot_id
        (self.nl,) = self._encode("\n", one=True)
        self.ends_line = np.array([tokenizer.decode([i]).endswith("\n")
                                   for i in range(tokenizer.vocab_size)], dtype=bool)
        self.heads = {n: (self._encode(f"{n} ="), self._encode(f"assert {n} ==")) for n in names}
        self.max_head = max(len(h) for h, _ in self.heads.values())
        # the shortest distance every episode can take: a value, its newline, one token of
        # filler (the newline before the assert) and the assert's head
        self.min_distance = MAX_VALUE_TOKENS + 2 + max(len(a) for _, a in self.heads.values())

    def _encode(self, text: str, one: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text)
        if self.tokenizer.decode(ids) != text or (one and len(ids) != 1):
            raise ValueError(f"the tokenizer {self.tokenizer!r} cannot encode the passkey "
                             f"episode's {text!r} " + ("as one token" if one else "faithfully"))
        return ids

    def value_ids(self, value: int) -> tuple[int, ...]:
        """The value as the binding and the answer write it: a space, then its digits."""
        if value not in self._values:
            ids = self._encode(f" {value}")
            if len(ids) > MAX_VALUE_TOKENS:
                raise ValueError(f"the tokenizer spells {value} in {len(ids)} tokens")
            self._values[value] = tuple(ids)
        return self._values[value]

    def code(self, ids: Sequence[int] | np.ndarray | Tensor) -> Code:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.ends_line)):
            raise ValueError(f"code ids must lie in [0, {len(self.ends_line)}) (the tokenizer's "
                             "vocabulary)")
        starts = np.r_[0, np.flatnonzero(self.ends_line[ids[:-1]]) + 1]
        return Code(ids, starts, np.flatnonzero(ids == self.eot))

    def draw(self, rng: np.random.Generator, held_out: bool) -> tuple[str, int]:
        """A name and a value of the held-out eighth (``held_out``) or of the rest."""
        while True:
            value = int(rng.integers(LOW, HIGH))
            if is_held_out(value) == held_out:
                return self.names[int(rng.integers(len(self.names)))], value

    def episode(self, code: Code, rng: np.random.Generator, name: str, value: int,
                distance: int, prefix: int, suffix: int = 0, bos: bool = False,
                bound: bool = True) -> Episode:
        """``[<|endoftext|>]`` if ``bos``, ``prefix`` tokens of code, the binding, filler, the
        assert and its answer, ``suffix`` tokens of code: the code one stretch of one file,
        placed by ``rng`` (the same draws give the same stretch, ``bound`` or not)."""
        head, use = self.heads[name]
        value_ids = list(self.value_ids(value))
        binding, answer = [*head, *value_ids, self.nl], [*value_ids, self.nl]
        filler = distance - len(value_ids) - 1 - len(use)
        if filler < 1:
            raise ValueError(f"distance {distance} is too short for the episode of {name} = "
                             f"{value}: at least {distance - filler + 1} tokens")
        need = prefix + len(binding) + filler + suffix  # code tokens of the unbound episode
        start = self._place(code, rng, prefix, need)
        c = code.ids[start : start + need]
        inserted = binding if bound else c[prefix : prefix + len(binding)].tolist()
        at = prefix + (0 if bound else len(binding))
        fill = c[at : at + filler].copy()
        if not self.ends_line[fill[-1]]:
            fill[-1] = self.nl  # the assert starts a line
        rest = c[at + filler : at + filler + suffix]
        ids = np.concatenate([np.full(int(bos), self.eot), c[:prefix], inserted, fill, use,
                              answer, rest]).astype(np.int64)
        first = bos + prefix + len(head)
        return Episode(ids, name, value, first, first + distance, len(answer), bound)

    def _place(self, code: Code, rng: np.random.Generator, prefix: int, need: int) -> int:
        """Where the stretch starts: ``prefix`` tokens before a line start, within one file."""
        for _ in range(PLACEMENT_TRIES):
            line = int(code.line_starts[rng.integers(len(code.line_starts))])
            start = line - prefix
            end = start + need
            if start < 0 or end > len(code.ids):
                continue
            i = np.searchsorted(code.ends, start)
            if i == len(code.ends) or code.ends[i] >= end:
                return start
        raise ValueError(f"the code ({len(code.ids)} tokens) has no stretch of {need} tokens "
                         "within one file that starts a line: give longer code (or a shorter "
                         "distance)")

    def training_row(self, code: Code, rng: np.random.Generator, length: int,
                     bos: bool = False) -> Episode:
        """A training window of ``length`` tokens holding one episode of a training value, at a
        distance drawn uniformly from those that fit, at a random place."""
        name, value = self.draw(rng, held_out=False)
        head, _ = self.heads[name]
        room = length - bos - len(head) - len(self.value_ids(value)) - 1
        if room < self.min_distance:
            raise ValueError(f"windows of {length} tokens are too short for a passkey episode "
                             f"(at least {self.min_distance + length - room})")
        distance = int(rng.integers(self.min_distance, room + 1))
        prefix = int(rng.integers(0, room - distance + 1))
        return self.episode(code, rng, name, value, distance, prefix, room - distance - prefix,
                            bos)

    def held_out(self, code: Code, n: int, distance: int, prefix: int = 16, seed: int = 0,
                 bos: bool = False, bound: bool = True) -> list[Episode]:
        """``n`` episodes of held-out values at ``distance``, all of one length (the prefix
        grows where the name and the value take fewer tokens), the answer last."""
        if n < 1:
            raise ValueError(f"n must be at least 1 episode, got {n}")
        if distance < self.min_distance:
            raise ValueError(f"distance must be at least {self.min_distance} tokens (the value, "
                             f"the assert's head and a newline between), got {distance}")
        rng = np.random.default_rng([seed, 1])
        drawn = [self.draw(rng, held_out=True) for _ in range(n)]
        extra = [len(self.heads[nm][0]) + len(self.value_ids(v)) + 1 for nm, v in drawn]
        top = max(extra)
        return [self.episode(code, np.random.default_rng([seed, 2, distance, i]), nm, v,
                             distance, prefix + top - e, 0, bos, bound)
                for i, ((nm, v), e) in enumerate(zip(drawn, extra, strict=True))]


@functools.lru_cache(maxsize=8)
def passkeys_for(tokenizer: Tokenizer) -> Passkeys:
    """One ``Passkeys`` per tokenizer, kept."""
    return Passkeys(tokenizer)


@functools.lru_cache(maxsize=4)
def held_out_code(tokenizer: Tokenizer, root: str | None = None) -> np.ndarray:
    """The test split of the standard library (``kvlib.corpus``) in ``tokenizer``'s ids, files
    separated by ``<|endoftext|>``: the default filler of held-out episodes."""
    encode = getattr(tokenizer, "encode_ordinary", tokenizer.encode)
    parts = []
    for _, text in Corpus.build(root).texts("test"):
        parts += [encode(text), [tokenizer.eot_id]]
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    ids.flags.writeable = False  # kept by the cache: shared by every call
    return ids


@dataclass
class Recall:
    """The passkey test's result at one distance through one cache."""

    accuracy: float  # share of episodes whose whole answer is the argmax, token after token
    token_accuracy: float  # share of the answers' tokens that are
    without_binding: float | None  # accuracy with the binding line replaced by code
    chance: float  # one in the number of values
    distance: int
    n: int
    tokens: int  # each episode's length
    cache: str = "none"
    window: int | None = None
    correct: Tensor | None = None  # (n,) bool

    def __repr__(self) -> str:
        base = "" if self.without_binding is None else f", {self.without_binding:.0%} unbound"
        return (f"Recall({self.accuracy:.0%} of {self.n} at distance {self.distance}, "
                f"cache={self.cache!r}, window={self.window}{base}, chance {self.chance:.1e})")


def recall(model: CausalLM, cache: str | None = None, distance: int = 128, n: int = 32,
           window: int | None = None, *, prefix: int = 16, seed: int = 0, bos: bool = False,
           filler: Sequence[int] | np.ndarray | Tensor | str | None = None,
           baseline: bool = True, **cache_options) -> Recall:
    """Passkey retrieval of ``model`` through ``cache`` (options as for ``kvlib.perplexity``):
    the share of ``n`` held-out episodes at ``distance`` tokens whose answer the model predicts
    exactly (teacher-forced argmax, which is what greedy decoding writes), and, with
    ``baseline``, the same with the binding removed. ``bos`` starts every episode with
    ``<|endoftext|>`` (for a model trained so); ``filler`` is the code to cut episodes from
    (ids or text; default the standard library's test split, ``held_out_code``)."""
    tok = tokenizer_for(model)
    keys = passkeys_for(tok)
    if filler is None:
        filler = held_out_code(tok)
    elif isinstance(filler, str):
        filler = getattr(tok, "encode_ordinary", tok.encode)(filler)
    code = keys.code(filler)
    episodes = keys.held_out(code, n, distance, prefix, seed, bos)
    rows = torch.from_numpy(np.stack([e.ids for e in episodes]))
    _check_fits(model, cache, window, rows, distance, cache_options)
    correct, tokens = _answered(model, rows, episodes, cache, window, cache_options)
    unbound = None
    if baseline:
        empty = keys.held_out(code, n, distance, prefix, seed, bos, bound=False)
        rows = torch.from_numpy(np.stack([e.ids for e in empty]))
        hits = _answered(model, rows, empty, cache, window, cache_options)[0]
        unbound = float(hits.float().mean())
    return Recall(float(correct.float().mean()), tokens, unbound, 1 / N_VALUES, distance, n,
                  rows.shape[1], "none" if cache is None else cache, window, correct)


def _check_fits(model: CausalLM, cache: str | None, window: int | None, rows: Tensor,
                distance: int, options: dict) -> None:
    """Clear errors before the run: ids the model has, and a length its positions allow."""
    vocab = model.cfg.vocab_size
    if int(rows.max()) >= vocab:
        raise ValueError(f"the episodes use token ids up to {int(rows.max())} but the model has "
                         f"{vocab}: its tokenizer does not fit it (load it with kvlib.load_model)")
    T, ctx = rows.shape[1], model.cfg.context_length
    if T <= ctx:
        return
    most = distance - (T - ctx)
    name = "none" if cache is None else cache
    traits = strategy(name).traits
    slides = (window is not None or "budget" in options or traits.reuses_slots
              or traits.recomputes_window)
    if model.hard_context:
        raise ValueError(f"an episode at distance {distance} takes {T} tokens, but this model "
                         f"has {ctx} learned positions: ask for a distance of at most {most}")
    if not slides:
        raise ValueError(f"an episode at distance {distance} takes {T} tokens, more than the "
                         f"model's context ({ctx}), and the {name!r} cache keeps every token: ask "
                         f"for a distance of at most {most}, or use a cache that slides "
                         "(sliding, sinks, recompute, evict)")


def _answered(model: CausalLM, rows: Tensor, episodes: list[Episode], cache: str | None,
              window: int | None, options: dict) -> tuple[Tensor, float]:
    """Which episodes' answers are every one the argmax ``(n,)``, and the share of tokens."""
    result = perplexity(model, rows, cache=cache, window=window,
                        stream=cache is not None and strategy(cache).traits.recomputes_window,
                        **options)  # streamed: the one-pass window gives no argmax
    top1 = result.top1.view(rows.shape[0], -1)  # prediction t is of token t + 1
    hits = [top1[i, e.answer - 1 : e.answer - 1 + e.answer_len] ==
            rows[i, e.answer : e.answer + e.answer_len] for i, e in enumerate(episodes)]
    share = sum(int(h.sum()) for h in hits) / sum(h.numel() for h in hits)
    return torch.stack([h.all() for h in hits]), share
