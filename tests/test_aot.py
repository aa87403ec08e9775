"""kvlib.aot: the AOTInductor-compiled decode step gives the tokens of eager decoding and of
recomputation, leaves the caches holding the text, and refuses what it does not compile."""

import pytest
import torch

import kvlib
from kvlib.aot import AotDecoder


@pytest.fixture(scope="module")
def tiny():
    return kvlib.load_model("tiny-llama")


@pytest.fixture(scope="module")
def decoder(tiny):
    return AotDecoder(tiny, 48, batch=2)


def prompt(model, B=2, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)


def test_tokens_are_eager_decodings_and_recomputations(tiny, decoder):
    ids = prompt(tiny)
    tokens, seconds = decoder.generate(ids, 30)
    assert tokens.shape == (2, 37) and len(seconds) == 29 and min(seconds) > 0
    assert torch.equal(tokens, kvlib.generate(tiny, ids, 30, cache="prealloc").tokens)
    assert torch.equal(tokens, kvlib.generate(tiny, ids, 30, cache=None).tokens)


def test_the_caches_hold_the_text_after(tiny, decoder):
    ids = prompt(tiny, seed=1)
    tokens, _ = decoder.generate(ids, 10)
    assert all(c.get_seq_length() == 16 for c in tiny.caches)  # the last token is not fed yet
    with torch.inference_mode():  # an eager step continues where the compiled ones left off
        nxt = tiny(tokens[:, -1:], use_cache=True, last_only=True)[:, -1].argmax(-1)
    assert torch.equal(nxt, kvlib.generate(tiny, ids, 11, cache=None).tokens[:, -1])


def test_a_second_text_starts_afresh(tiny, decoder):
    ids = prompt(tiny, seed=2)
    first, _ = decoder.generate(ids, 12)
    again, _ = decoder.generate(ids, 12)
    assert torch.equal(first, again)


def test_qwen3_norms_and_one_row():
    model = kvlib.load_model("tiny-qwen3")
    ids = prompt(model, B=1, seed=3)
    tokens, _ = AotDecoder(model, 32).generate(ids, 20)
    assert torch.equal(tokens, kvlib.generate(model, ids, 20, cache=None).tokens)


def test_gpt2_learned_positions():
    model = kvlib.load_model("tiny")
    ids = prompt(model, B=1, seed=4)
    tokens, _ = AotDecoder(model, 40).generate(ids, 25)
    assert torch.equal(tokens, kvlib.generate(model, ids, 25, cache=None).tokens)
    with pytest.raises(ValueError, match="learned positions"):
        AotDecoder(model, model.cfg.context_length + 1)


def test_clear_errors(tiny, decoder):
    with pytest.raises(TypeError, match="Llama family"):
        AotDecoder(kvlib.load_model("tiny-gpt-oss"), 16)
    with pytest.raises(ValueError, match="batch=1"):
        decoder.generate(prompt(tiny, B=1), 4)
    with pytest.raises(ValueError, match="larger max_len"):
        decoder.generate(prompt(tiny), 45)
    with pytest.raises(ValueError, match="max_len"):
        AotDecoder(tiny, 1)
