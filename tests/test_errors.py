"""Bad input gets a clear error that says what to do."""

import pytest
import torch
from conftest import make_model

import kvlib

P = torch.tensor([[1, 2, 3]])


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


def test_forward_past_positions_with_cache(tiny):
    tiny.set_kv_cache("concat")
    with torch.no_grad():
        tiny(torch.ones((1, tiny.cfg.context_length), dtype=torch.long), use_cache=True)
        with pytest.raises(ValueError, match="reset_kv_cache"):
            tiny(torch.ones((1, 1), dtype=torch.long), use_cache=True)


def test_prealloc_full(tiny):
    tiny.set_kv_cache("prealloc", max_len=4)
    with torch.no_grad():
        tiny(torch.tensor([[1, 2, 3, 4]]), use_cache=True)
        with pytest.raises(RuntimeError, match=r"PreallocCache is full: it holds 4 of 4.*max_len"):
            tiny(torch.tensor([[5]]), use_cache=True)


@pytest.mark.parametrize("strategy,window", [("concat", None), ("prealloc", None), ("sliding", 8)])
def test_batch_size_changes_without_reset(tiny, strategy, window):
    tiny.set_kv_cache(strategy, window=window)
    with torch.no_grad():
        tiny(torch.tensor([[1, 2], [3, 4]]), use_cache=True)
        with pytest.raises(ValueError, match=r"batch size 2.*reset_kv_cache.* before a new batch"):
            tiny(torch.tensor([[5]]), use_cache=True)
        tiny.reset_kv_cache()
        tiny(torch.tensor([[5]]), use_cache=True)  # after a reset a new batch size is fine


@pytest.mark.parametrize("cls,kw", [(kvlib.ConcatCache, {}), (kvlib.PreallocCache, {"max_len": 8}),
                                    (kvlib.SlidingWindowCache, {"window": 4})])
def test_keys_of_wrong_dtype_or_device(cls, kw):
    cache = cls(**kw)
    k = torch.zeros(1, 2, 3, 4)
    cache.update(k, k)
    bad = k[:, :, :1].to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"bfloat16 on cpu but the cache holds torch.float32"):
        cache.update(bad, bad)
    if torch.device("meta") != k.device:
        meta = torch.zeros(1, 2, 1, 4, device="meta")
        with pytest.raises(TypeError, match="on meta but the cache holds"):
            cache.update(meta, meta)
    with pytest.raises(ValueError, match="same shape"):
        cache.update(k, k[:, :1])


@pytest.mark.parametrize("window", [0, -3])
def test_window_not_positive(tiny, window):
    with pytest.raises(ValueError, match="window must be between 1 and the context length"):
        kvlib.generate(tiny, P, 5, cache="sliding", window=window)
    with pytest.raises(ValueError, match="window must be a positive number"):
        kvlib.SlidingWindowCache(window)


def test_window_larger_than_context(tiny):
    with pytest.raises(ValueError, match=r"between 1 and the context length \(256 tokens\)"):
        kvlib.generate(tiny, P, 5, cache="sliding", window=257)


def test_sliding_needs_window_and_others_refuse_it(tiny):
    with pytest.raises(ValueError, match="needs a window"):
        kvlib.generate(tiny, P, 5, cache="sliding")
    with pytest.raises(ValueError, match="window applies to 'sliding'"):
        kvlib.generate(tiny, P, 5, cache="prealloc", window=4)


def test_temperature_negative(tiny):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        kvlib.generate(tiny, P, 5, temperature=-0.5)


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_not_positive(tiny, top_k):
    with pytest.raises(ValueError, match="top_k must be a positive"):
        kvlib.generate(tiny, P, 5, temperature=1.0, top_k=top_k)


def test_token_ids_not_integers(tiny):
    with pytest.raises(TypeError, match=r"must be integers \(torch.long\), got torch.float32"):
        kvlib.generate(tiny, torch.tensor([[1.0, 2.0]]), 5)
    with pytest.raises(TypeError, match="must be a torch tensor"):
        kvlib.generate(tiny, [[1, 2]], 5)
    with pytest.raises(ValueError, match=r"shape \(batch, tokens\)"):
        kvlib.generate(tiny, torch.tensor([1, 2]), 5)


@pytest.mark.parametrize("bad", [-1, 50257, 10**6])
def test_token_ids_out_of_vocabulary(tiny, bad):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50257\)"):
        kvlib.generate(tiny, torch.tensor([[1, bad]]), 5, cache="concat")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50257\)"):
        tiny(torch.tensor([[bad]]))
    tiny.set_kv_cache("prealloc", max_len=8)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50257\)"):
        kvlib.prefill(tiny, torch.tensor([[1, bad]]))  # decode_one then trusts the model's tokens


def test_skipping_the_id_check_changes_nothing_else(tiny):
    idx = torch.tensor([[5, 17, 50256]])
    torch.testing.assert_close(tiny(idx, check_ids=False), tiny(idx), rtol=0, atol=0)


def test_unknown_cache_name(tiny):
    with pytest.raises(ValueError, match=r"unknown cache 'paged'; choose None or one of"):
        kvlib.generate(tiny, P, 5, cache="paged")
    with pytest.raises(ValueError, match="unknown cache 'paged'"):
        tiny.set_kv_cache("paged")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'; choose one of"):
        kvlib.GPTConfig.from_preset("gpt5")


def test_negative_max_new_tokens(tiny):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        kvlib.generate(tiny, P, -1)


def test_prealloc_max_len_not_positive():
    with pytest.raises(ValueError, match="max_len must be a positive"):
        kvlib.PreallocCache(0)


def test_tokenizer_failure_names_cache_dir(monkeypatch):
    import tiktoken

    from kvlib import tokenizer

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    tokenizer.get_tokenizer.cache_clear()
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
        kvlib.encode("hello")
    tokenizer.get_tokenizer.cache_clear()


def test_make_model_is_deterministic():
    a, b = make_model(seed=7), make_model(seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
