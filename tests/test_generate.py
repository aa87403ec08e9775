"""Generation pieces: sampling, the stream, eos, and clear errors for bad arguments."""

import pytest
import torch

import kvlib

P = torch.tensor([[1, 2, 3]])


def test_sample_greedy_temperature_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert kvlib.sample(logits).tolist() == [[1]]
    g = torch.Generator().manual_seed(0)
    draws = {kvlib.sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}  # only the two best tokens
    g = torch.Generator().manual_seed(0)
    draws = [kvlib.sample(logits, 5.0, generator=g).item() for _ in range(400)]
    assert set(draws) == {0, 1, 2, 3}  # a high temperature reaches every token
    assert kvlib.sample(logits, 1.0, top_k=1000).shape == (1, 1)  # top_k above vocab is clamped


def test_greedy_is_argmax_and_takes_the_first_of_equal_maxima():
    from kvlib.sampling import greedy

    g = torch.Generator().manual_seed(0)
    for shape in ((1, 8192), (8, 50257), (2, 3, 64)):
        x = torch.randn(shape, generator=g)
        assert torch.equal(greedy(x), x.argmax(dim=-1, keepdim=True))
    ties = torch.zeros(3, 100)
    ties[:, [7, 40, 99]] = 1.0
    ties[1, 3] = float("nan")  # a NaN is the maximum, as for argmax
    assert greedy(ties)[:, 0].tolist() == [7, 3, 7]
    assert greedy(ties.bfloat16())[:, 0].tolist() == [7, 3, 7]


def test_seeded_sampling_is_reproducible_and_same_across_caches(tiny):
    p = torch.tensor([[1, 2, 3]])
    a = kvlib.generate(tiny, p, 40, temperature=0.8, top_k=50, seed=11)
    b = kvlib.generate(tiny, p, 40, temperature=0.8, top_k=50, seed=11)
    c = kvlib.generate(tiny, p, 40, temperature=0.8, top_k=50, seed=12)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    d = kvlib.generate(tiny, p, 40, cache="prealloc", temperature=0.8, top_k=50, seed=11)
    assert torch.equal(a.tokens, d.tokens)


def test_eos_stops_generation(tiny):
    p = torch.tensor([[1, 2, 3]])
    free = kvlib.generate(tiny, p, 30, cache="concat")
    eos = free.tokens[0, 3 + 4].item()  # the fifth new token
    first = (free.tokens[0, 3:] == eos).nonzero()[0].item()
    out = kvlib.generate(tiny, p, 30, cache="concat", eos_id=eos)
    assert out.tokens.shape[1] == 3 + first + 1
    assert out.tokens[0, -1].item() == eos


def test_stream_steps(tiny):
    p = torch.tensor([[1, 2, 3], [4, 5, 6]])
    steps = list(kvlib.generate_stream(tiny, p, 12, cache="prealloc"))
    assert [s.index for s in steps] == list(range(12))
    assert [s.seq_len for s in steps] == list(range(4, 16))
    assert all(s.tokens.shape == (2,) and s.seconds > 0 for s in steps)
    res = kvlib.generate(tiny, p, 12, cache="prealloc")
    assert torch.equal(torch.stack([s.tokens for s in steps], 1), res.tokens[:, 3:])
    assert len(res.step_times) == 11 and res.decode_tokens_per_s > 0 and res.cache == "prealloc"


def test_zero_new_tokens(tiny):
    p = torch.tensor([[1, 2, 3]])
    out = kvlib.generate(tiny, p, 0, cache="concat")
    assert torch.equal(out.tokens, p) and out.step_times == []


def test_empty_prompt(tiny):
    with pytest.raises(ValueError, match="at least one token"):
        kvlib.generate(tiny, torch.zeros((1, 0), dtype=torch.long), 5)


def test_prompt_longer_than_context(tiny):
    long = torch.ones((1, tiny.cfg.context_length + 1), dtype=torch.long)
    for cache in (None, "concat"):
        with pytest.raises(ValueError, match=r"context is 256: keep the last 256 tokens"):
            kvlib.generate(tiny, long, 5, cache=cache)
    with pytest.raises(ValueError, match="crop the input"):
        tiny(long)


def test_cache_cannot_pass_learned_positions(tiny):
    ctx = tiny.cfg.context_length
    for cache, window in [("concat", None), ("prealloc", None), ("sliding", 8)]:
        with pytest.raises(ValueError, match=rf"learned positions.*at most {ctx - 3} new tokens"):
            kvlib.generate(tiny, P, ctx, cache=cache, window=window)
    out = kvlib.generate(tiny, P, ctx - 3, cache="concat")  # exactly up to the limit is fine
    assert out.tokens.shape == (1, ctx)
    out = kvlib.generate(tiny, P, ctx + 10)  # no cache: the input is cropped, as GPT-2 allows
    assert out.tokens.shape == (1, ctx + 13)


def test_temperature_negative(tiny):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        kvlib.generate(tiny, P, 5, temperature=-0.5)


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_not_positive(tiny, top_k):
    with pytest.raises(ValueError, match="top_k must be a positive"):
        kvlib.generate(tiny, P, 5, temperature=1.0, top_k=top_k)


def test_unknown_cache_name(tiny):
    with pytest.raises(ValueError, match=r"unknown cache 'radix'; choose None or one of"):
        kvlib.generate(tiny, P, 5, cache="radix")
    with pytest.raises(ValueError, match="unknown cache 'radix'"):
        tiny.set_kv_cache("radix")


def test_negative_max_new_tokens(tiny):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        kvlib.generate(tiny, P, -1)
