"""kvlib.passkey: episodes at exactly the distance asked, held-out ones disjoint from training
ones, and kvlib.recall through every cache: a hand-built model that copies the token
``distance - 1`` back recalls every answer while the binding is in view and none once a sliding
window is one token too short for it."""

import bisect
import calendar
import colorsys
import difflib
import fnmatch
import glob
import heapq
import re
import shlex
import string
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import kvlib
from kvlib.corpus import split_of
from kvlib.passkey import N_VALUES, NAMES, Passkeys, held_out_code, is_held_out
from kvlib.tokenizer import EOT_ID

KVLIB = Path(kvlib.__file__).parent
BYTES = kvlib.TrimmedTokenizer([*range(256), EOT_ID])  # every character one token


def code_of(tok, paths) -> np.ndarray:
    parts = []
    for p in paths:
        parts += [tok.encode_ordinary(p.read_text()), [tok.eot_id]]
    return np.concatenate([np.asarray(x, dtype=np.int64) for x in parts])


# Code to cut episodes from: modules of this Python's standard library, which stay the same while
# kvlib's own files come and go (the corpus is the standard library too).
SOURCES = [Path(m.__file__) for m in (textwrap, string, colorsys, bisect, heapq, fnmatch, shlex,
                                      glob, calendar, difflib)]
STDLIB = sorted(Path(textwrap.__file__).parent.glob("*.py"))  # more files, for the splits
TRAIN_FILES, TEST_FILES = SOURCES[:6], SOURCES[6:10]


@pytest.fixture(scope="module")
def keys():
    return Passkeys(BYTES)


@pytest.fixture(scope="module")
def test_code(keys):
    return keys.code(code_of(BYTES, TEST_FILES))


def contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    n = len(needle)
    if n == 0:
        return True
    windows = np.lib.stride_tricks.sliding_window_view(haystack, n)
    return bool((windows == needle).all(axis=1).any())


@pytest.mark.parametrize("distance", [28, 45, 300])
def test_held_out_episodes_are_at_the_distance_asked(keys, test_code, distance):
    episodes = keys.held_out(test_code, 12, distance, prefix=5, seed=3)
    assert len({len(e.ids) for e in episodes}) == 1  # one batch: every episode as long
    for e in episodes:
        ids, head, use = e.ids, *keys.heads[e.name]
        value = list(keys.value_ids(e.value))
        assert e.answer - e.binding == distance == e.distance
        assert ids[e.binding : e.binding + len(value)].tolist() == value  # bound here...
        assert ids[e.answer :].tolist() == [*value, keys.nl]  # ... and the answer ends it
        assert ids[e.answer - len(use) : e.answer].tolist() == use
        start = e.binding - len(head)
        assert start >= 5 and keys.ends_line[ids[start - 1]]  # the binding starts a line
        text = BYTES.decode(ids.tolist())
        assert f"\n{e.name} = {e.value}\n" in text and text.endswith(
            f"\nassert {e.name} == {e.value}\n")
        # the prefix and the filler are one stretch of the test code, in one file
        filler = ids[e.binding + len(value) + 1 : e.answer - len(use) - 1]
        assert contains(test_code.ids, ids[:start]) and contains(test_code.ids, filler)
        assert keys.eot not in ids.tolist()


def test_held_out_and_training_values_are_disjoint_and_drawn_from_their_code(keys, test_code):
    train_code = keys.code(code_of(BYTES, TRAIN_FILES))
    trained = set()
    for i in range(60):
        e = keys.training_row(train_code, np.random.default_rng([9, i]), 200)
        text = BYTES.decode(e.ids.tolist())
        (name, value), = re.findall(r"(?:^|\n)([A-Z_]+) = (\d{5})\n", text)
        assert f"\nassert {name} == {value}\n" in text and len(e.ids) == 200
        assert keys.min_distance <= e.distance and not is_held_out(int(value))
        filler = e.ids[e.binding + len(keys.value_ids(e.value)) + 1 :
                       e.answer - len(keys.heads[name][1]) - 1]
        assert contains(train_code.ids, filler)
        assert len(filler) < 100 or not contains(test_code.ids, filler)  # not the test code's
        trained.add(int(value))
    held = {e.value for d in (30, 60) for e in keys.held_out(test_code, 40, d, seed=1)}
    assert all(is_held_out(v) for v in held) and not trained & held
    share = np.mean([is_held_out(v) for v in range(10_000, 100_000)])
    assert share == pytest.approx(1 / 8, abs=0.01)
    # the same seed, the same episodes; another seed, others
    again = keys.held_out(test_code, 4, 30, seed=1)
    assert all(np.array_equal(a.ids, b.ids) for a, b in
               zip(again, keys.held_out(test_code, 4, 30, seed=1), strict=True))
    assert not np.array_equal(again[0].ids, keys.held_out(test_code, 4, 30, seed=2)[0].ids)


def test_the_default_filler_is_the_test_split(tmp_path):
    want, i = {"test": 1, "train": 2, "valid": 1}, 0
    while any(want.values()):
        name = f"m{i}.py"
        if want[split_of(name)]:
            want[split_of(name)] -= 1
            (tmp_path / name).write_text(STDLIB[i].read_text())
            if split_of(name) == "test":
                expected = [*BYTES.encode_ordinary(STDLIB[i].read_text()), BYTES.eot_id]
        i += 1
    assert held_out_code(BYTES, str(tmp_path)).tolist() == expected


# --- recall -----------------------------------------------------------------------------------

CTX = 128


def copier(distance: int) -> kvlib.GPTModel:
    """A one-layer GPT-2 whose every prediction is the token ``distance - 1`` positions before
    the query: one-hot tokens and positions, a query that names the position ``distance - 1``
    back, the value the token found there. It answers a passkey episode at ``distance`` exactly
    when it can attend to the binding."""
    V = BYTES.vocab_size
    D = V + CTX
    model = kvlib.GPTModel(kvlib.GPTConfig(vocab_size=V, context_length=CTX, emb_dim=D,
                                           n_heads=1, n_layers=1))
    eye = torch.eye(D)
    mean = 2 / D  # every input is two ones: its token and its position
    s = (2 / D - mean**2 + 1e-5) ** 0.5  # LayerNorm's scale, the same for every input
    R = 2.5
    wq, wk, wv = torch.zeros(D, D), torch.zeros(D, D), torch.zeros(D, D)
    for p in range(distance - 1, CTX):
        wq[V + p - distance + 1, V + p] = R
    for p in range(CTX):
        wk[V + p, V + p] = R
    wv[:V, :V] = torch.eye(V)
    # the biases undo LayerNorm's mean, so each projection reads the one-hot input times 1/s
    bias = torch.cat([w.sum(1) * mean / s for w in (wq, wk, wv)])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wte.weight.copy_(eye[:V])
        model.wpe.weight.copy_(eye[V:])
        for ln in (model.h[0].ln_1, model.h[0].ln_2, model.ln_f):
            ln.weight.fill_(1.0)
        model.h[0].attn.c_attn.weight.copy_(torch.cat([wq, wk, wv]))
        model.h[0].attn.c_attn.bias.copy_(bias)
        model.h[0].attn.c_proj.weight.copy_(torch.diag((torch.arange(D) < V).float()))
    model.tokenizer = BYTES
    return model.eval()


@pytest.fixture(scope="module")
def filler():
    return code_of(BYTES, TEST_FILES)


def test_recall_is_perfect_in_view_and_at_chance_once_the_window_is_one_token_short(filler):
    d = 48
    model = copier(d)
    opts = dict(distance=d, n=16, prefix=4, filler=filler)
    full = kvlib.recall(model, **opts)
    assert full.accuracy == 1.0 and full.token_accuracy == 1.0 and full.tokens <= CTX
    assert full.without_binding == 0.0 and full.chance == 1 / N_VALUES  # nothing to copy
    for cache in ("sliding", None):  # the ring, and full attention masked to the same span
        seen = kvlib.recall(model, cache=cache, window=d, **opts)
        assert seen.accuracy == 1.0, cache
        short = kvlib.recall(model, cache=cache, window=d - 1, **opts)
        assert short.accuracy == 0.0 and short.token_accuracy < 0.5, cache
        assert not short.correct.any()
    assert kvlib.recall(model, cache="prealloc", **opts).accuracy == 1.0
    assert kvlib.recall(copier(d + 1), **opts).accuracy == 0.0  # one token off: nothing


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_recall_runs_through_every_cache(make_model, make_llama, filler, family):
    small = dict(vocab_size=BYTES.vocab_size, context_length=CTX)
    model = make_llama(**small) if family == "llama" else make_model(**small)
    model.tokenizer = BYTES
    opts = dict(distance=40, n=3, prefix=4, filler=filler)
    ref = kvlib.recall(model, **opts)
    caches = {"concat": {}, "prealloc": {}, "sliding": {"window": 32}, "recompute": {"window": 32},
              "bf16": {}, "quantized": {"bits": 8}, "evict": {"budget": 40}}
    if family == "llama":
        caches["sinks"] = {"window": 28, "n_sink": 4}
    for cache, options in caches.items():
        r = kvlib.recall(model, cache=cache, **opts, **options)
        assert r.cache == cache and r.n == 3 and 0 <= r.token_accuracy <= 1
        assert r.accuracy == ref.accuracy == 0.0  # a random model guesses no value in 90,000


def test_recall_says_what_is_wrong(make_model, make_llama, filler, keys):
    gpt = make_model(vocab_size=BYTES.vocab_size, context_length=CTX)
    gpt.tokenizer = BYTES
    with pytest.raises(ValueError, match="at least 28"):
        kvlib.recall(gpt, distance=20, filler=filler)
    with pytest.raises(ValueError, match="n must be at least 1"):
        kvlib.recall(gpt, distance=40, n=0, filler=filler)
    with pytest.raises(ValueError, match="128 learned positions: ask for a distance of at most"):
        kvlib.recall(gpt, cache="sliding", window=64, distance=120, n=2, filler=filler)
    llama = make_llama(vocab_size=BYTES.vocab_size, context_length=64)
    llama.tokenizer = BYTES
    with pytest.raises(ValueError, match="keeps every token.*cache that slides"):
        kvlib.recall(llama, cache="prealloc", distance=60, n=2, filler=filler)
    with pytest.warns(UserWarning, match="past the 64 tokens"):  # a ring goes on: it runs
        kvlib.recall(llama, cache="sliding", window=32, distance=60, n=2, filler=filler)
    with pytest.raises(ValueError, match="unknown cache"):
        kvlib.recall(gpt, cache="nope", distance=40, n=2, filler=filler)
    small = make_model(vocab_size=100, context_length=CTX)  # no lowercase letters
    small.tokenizer = BYTES
    with pytest.raises(ValueError, match="its tokenizer does not fit it"):
        kvlib.recall(small, distance=40, n=2, filler=filler)
    with pytest.raises(ValueError, match="no stretch of"):
        kvlib.recall(gpt, distance=60, n=2, filler=filler[:80])

    class Lossy:  # a tokenizer that cannot write digits
        vocab_size, eot_id = 257, 256

        def encode(self, text):
            return [ord(c) for c in text if not c.isdigit()]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    with pytest.raises(ValueError, match="cannot encode the passkey episode's ' 4"):
        Passkeys(Lossy()).value_ids(48213)
    assert set(keys.heads) == set(NAMES)
