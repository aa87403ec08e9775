"""kvlib.perplexity: per-token losses, streamed through every cache or in one forward pass."""

import math

import pytest
import torch
import torch.nn.functional as F

import kvlib
from kvlib.evaluate import Perplexity

pytestmark = pytest.mark.usefixtures("one_thread")
T, WINDOW = 40, 12


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, make_model, make_llama):
    return make_model("tiny") if request.param == "gpt2" else make_llama("tiny-llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50257, (T,), generator=torch.Generator().manual_seed(0))


def test_perplexity_is_exp_of_the_mean_nll(model, ids):
    result = kvlib.perplexity(model, ids)
    assert isinstance(result, Perplexity) and result.nll.shape == (T - 1,)
    assert result.nll.dtype == torch.float32 and result.tokens == T - 1
    assert result.perplexity == pytest.approx(math.exp(result.nll.mean().item()), rel=1e-12)
    with torch.no_grad():
        logits = model(ids[None])[0]
    torch.testing.assert_close(result.nll, F.cross_entropy(logits[:-1], ids[1:], reduction="none"))


def test_streaming_equals_one_forward(model, ids):
    fast = kvlib.perplexity(model, ids)
    streamed = kvlib.perplexity(model, ids, stream=True)  # recomputation, token by token
    torch.testing.assert_close(streamed.nll, fast.nll, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache", ["concat", "prealloc"])
def test_full_caches_equal_recomputation(model, ids, cache):
    ref = kvlib.perplexity(model, ids, stream=True)
    got = kvlib.perplexity(model, ids, cache=cache)
    assert got.cache == cache
    torch.testing.assert_close(got.nll, ref.nll, atol=1e-4, rtol=0)


def test_sliding_cache_equals_windowed_recomputation(model, ids):
    ref = kvlib.perplexity(model, ids, window=WINDOW)  # one forward, masked to the window
    streamed_ref = kvlib.perplexity(model, ids, window=WINDOW, stream=True)
    got = kvlib.perplexity(model, ids, cache="sliding", window=WINDOW)
    torch.testing.assert_close(streamed_ref.nll, ref.nll, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.nll, ref.nll, atol=1e-4, rtol=0)
    full = kvlib.perplexity(model, ids)  # the window changes what the late tokens see
    torch.testing.assert_close(got.nll[: WINDOW - 1], full.nll[: WINDOW - 1], atol=1e-4, rtol=0)
    assert not torch.allclose(got.nll[WINDOW:], full.nll[WINDOW:], atol=1e-4)


def test_a_batch_is_scored_row_after_row(model, ids):
    rows = torch.stack([ids, ids.flip(0), ids.roll(7)])
    batch = kvlib.perplexity(model, rows, batch_size=2)
    single = torch.cat([kvlib.perplexity(model, r).nll for r in rows])
    torch.testing.assert_close(batch.nll, single, atol=1e-5, rtol=0)
    streamed = kvlib.perplexity(model, rows, cache="concat")
    torch.testing.assert_close(streamed.nll, single, atol=1e-4, rtol=0)


def test_the_model_is_handed_back_as_it_was(make_model, left_as_found, ids):
    model = make_model("tiny")
    kvlib.generate(model, ids[None, :5], 3, cache="prealloc")
    model.train()
    check = left_as_found(model)
    kvlib.perplexity(model, ids, cache="sliding", window=WINDOW)
    kvlib.perplexity(model, ids)
    check()


def test_errors(model):
    with pytest.raises(ValueError, match="at least two tokens"):
        kvlib.perplexity(model, [5])
    with pytest.raises(ValueError, match=r"must lie in \[0, 50257\)"):
        kvlib.perplexity(model, [5, 50257])


def test_attention_to_first_sums_the_softmax_weights_on_the_first_keys(make_llama):
    model = make_llama("tiny-llama")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40))
    model.set_kv_cache("sliding", window=8)
    mass = kvlib.attention_to_first(model, ids, n_first=3, skip=10)
    assert mass.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert ((mass > 0) & (mass < 1)).all()
    assert model.caches[0].name == "sliding" and model.caches[0].window == 8  # as found
    # the first layer by hand: its input is the embedding after the first norm
    layer = model.layers[0]
    cos, sin = model.rope(0, 40, like=ids.float())
    x = layer.input_layernorm(model.embed_tokens(ids))
    w = layer.self_attn.attention_weights(x, cos, sin)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, model.cfg.n_heads, 40))
    torch.testing.assert_close(mass[0], w[:, :, 10:, :3].sum(-1).mean(dim=(0, 2)))
    everything = kvlib.attention_to_first(model, ids, n_first=40, skip=39)
    torch.testing.assert_close(everything, torch.ones_like(everything))


def test_held_out_text_is_only_for_the_trained_models():
    with pytest.raises(ValueError, match="trained models"):
        kvlib.held_out("gpt2")
