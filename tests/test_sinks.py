"""Learned attention sinks (gpt-oss), as an option of the Llama family: the attention against a
written-out softmax over the scores and the sink, and against transformers' gpt-oss attention;
generation through every cache strategy equals recomputation."""

import pytest
import torch

import kvlib
from kvlib.models.base import attend_with
from kvlib.models.llama import GroupedQueryAttention, SinkAttention

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50257


def make(seed: int = 0, **overrides) -> kvlib.LlamaModel:
    """tiny-llama with sinks, the sink logits spread out (they start at 0: softmax plus one)."""
    torch.manual_seed(seed)
    model = kvlib.LlamaModel(kvlib.LlamaConfig.from_preset("tiny-llama", attn_sinks=True,
                                                           **overrides)).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)
    return model


@pytest.fixture(scope="module")
def sinky() -> kvlib.LlamaModel:
    return make()


def ids(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def reference(q, k, v, sinks, window=None):
    """Causal attention with a sink, written out: softmax over [scores, sink], sink dropped."""
    B, H, T, D = q.shape
    k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
    scores = q @ k.transpose(-1, -2) / D**0.5  # (B, H, T, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i) & (j > i - window if window else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    column = sinks.view(1, H, 1, 1).expand(B, H, T, 1)
    weights = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :T]
    return weights @ v


def test_the_parameter_is_named_and_shaped_as_transformers(sinky):
    attn = sinky.layers[0].self_attn
    assert isinstance(attn, SinkAttention) and attn.sinks.shape == (4,)
    assert "layers.1.self_attn.sinks" in sinky.state_dict()
    plain = kvlib.LlamaModel(kvlib.LlamaConfig.from_preset("tiny-llama"))
    assert type(plain.layers[0].self_attn) is GroupedQueryAttention  # the default is unchanged


@pytest.mark.parametrize("window", [None, 5])
def test_attention_equals_the_written_out_softmax(window):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 11, 8, generator=g), *torch.randn(2, 2, 2, 11, 8, generator=g)
    sinks = torch.randn(4, generator=g) * 2
    got = attend_with(q, k, v, None, window=window, sinks=sinks)
    torch.testing.assert_close(got, reference(q, k, v, sinks, window), atol=1e-6, rtol=0)
    very_negative = attend_with(q, k, v, None, window=window, sinks=torch.full((4,), -1e4))
    plain = attend_with(q, k, v, None, window=window)  # a sink at -inf takes nothing
    torch.testing.assert_close(very_negative, plain, atol=1e-6, rtol=0)


def test_attention_equals_transformers_gpt_oss_eager_attention():
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 9, 16, generator=g), *torch.randn(2, 1, 2, 9, 16, generator=g)
    module = torch.nn.Module()
    module.sinks, module.num_key_value_groups = torch.randn(4, generator=g), 2
    causal = torch.full((9, 9), float("-inf")).triu(1)[None, None]  # additive, as transformers
    theirs, _ = gpt_oss.eager_attention_forward(module, q, k, v, causal, scaling=16**-0.5)
    ours = attend_with(q, k, v, None, sinks=module.sinks)  # (B, H, T, D)
    torch.testing.assert_close(ours.transpose(1, 2), theirs, atol=1e-6, rtol=0)


def test_weights_give_the_rest_to_the_sink(sinky):
    x = torch.randn(1, 7, 64)
    cos, sin = sinky.rope(0, 7, like=x)
    with torch.no_grad():
        w = sinky.layers[0].self_attn.attention_weights(x, cos, sin)  # (1, H, 7, 7)
    assert (w.sum(-1) < 1).all() and (w.triu(1) == 0).all()


def test_sinks_change_the_model():
    a, b = make(), make()
    with torch.no_grad():
        for layer in b.layers:
            layer.self_attn.sinks.fill_(-1e4)  # no sink at all
        seq = ids((1, 20), 1)
        assert (a(seq) - b(seq)).abs().max() > 1e-3


@pytest.mark.parametrize("cache,options", [
    ("concat", {}), ("prealloc", {}), ("sliding", dict(window=256)), ("paged", {}),
    ("sinks", dict(window=200)), ("recompute", dict(window=256)), ("evict", dict(budget=200)),
])
def test_generation_through_every_cache_equals_recomputation(sinky, cache, options):
    """Every strategy whose capacity holds the text gives exactly the tokens of recomputation
    (the prefill runs the prompt at once, decoding one token a step)."""
    prompt = ids((2, 6), 2)
    ref = kvlib.generate(sinky, prompt, 70)
    with torch.no_grad():  # no near-tie among the greedy choices
        top2 = sinky(ref.tokens[:, :-1])[:, 5:].topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4
    out = kvlib.generate(sinky, prompt, 70, cache=cache, **options)
    assert torch.equal(out.tokens, ref.tokens)


@pytest.mark.parametrize("cache", ["sliding", "sinks"])
def test_a_window_that_bites_equals_its_recomputation(sinky, cache):
    prompt = ids((1, 30), 3)  # longer than the window: the prefill is cut too
    ref = kvlib.generate(sinky, prompt, 60, window=12)  # no cache, masked to 12
    if cache == "sliding":
        assert torch.equal(kvlib.generate(sinky, prompt, 60, cache="sliding", window=12).tokens,
                           ref.tokens)
    else:  # StreamingLLM's sinks on top of learned ones: runs, and holds its capacity
        out = kvlib.generate(sinky, prompt, 60, cache="sinks", window=12, n_sink=4)
        assert out.tokens.shape == ref.tokens.shape and sinky.caches[0].tokens_held == 16


def test_teacher_forced_logits_through_caches(sinky, teacher_forced):
    seq = ids((2, 40), 4)
    with torch.no_grad():
        ref = sinky(seq)
    for strategy in ("concat", "prealloc", "sliding"):
        got = teacher_forced(sinky, seq, strategy, prompt_len=9)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_padded_prompts_get_the_tokens_they_get_alone(sinky):
    prompts = [ids((1, 9), 5)[0], ids((1, 3), 6)[0]]
    out = kvlib.generate(sinky, prompts, 20, cache="concat")
    for seq, p in zip(out.sequences, prompts, strict=True):
        assert torch.equal(seq, kvlib.generate(sinky, p[None], 20).tokens[0])


def test_no_llama_checkpoint_has_sinks(sinky, tmp_path):
    with pytest.raises(ValueError, match="no transformers Llama or Qwen3 has learned attention"):
        kvlib.loading.save_model(sinky, tmp_path)
