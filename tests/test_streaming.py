"""Attention sinks and the recomputed window (kvlib.caches.streaming), against references written
out by hand: StreamingLLM's definition (each query sees the first n_sink tokens and its last window,
at positions counted inside the cache) computed one (query, key) pair at a time."""

import pytest
import torch
import torch.nn.functional as F

import kvlib
from kvlib.caches.streaming import SinkCache, rotate
from kvlib.models.llama import apply_rope


def _positions(t: int, n_sink: int, W: int) -> tuple[list[int], list[int], int]:
    """The keys query ``t`` sees and their positions in the cache, and the query's position."""
    if t < n_sink + W:  # not full yet: every earlier token, at its own position
        return list(range(t + 1)), list(range(t + 1)), t
    keys = list(range(n_sink)) + list(range(t - W + 1, t + 1))
    return keys, list(range(n_sink + W)), n_sink + W - 1


def _rope(x, pos, model):
    cos, sin = model.rope(0, max(pos) + 1, like=x)
    return apply_rope(x, cos[pos], sin[pos])


def _attention(layer, x, model, n_sink, W):
    """One attention layer over ``x`` (1, T, C) with the sink pattern, pair by pair."""
    a, (_, T, _) = layer.self_attn, x.shape
    q = a.q_proj(x).view(T, a.n_heads, a.head_dim)
    k = a.k_proj(x).view(T, a.n_kv_heads, a.head_dim)
    v = a.v_proj(x).view(T, a.n_kv_heads, a.head_dim)
    if a.q_norm is not None:
        q, k = a.q_norm(q), a.k_norm(k)
    group = a.n_heads // a.n_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (T, H, D)
    out = []
    for t in range(T):
        keys, kpos, qpos = _positions(t, n_sink, W)
        qt = _rope(q[t : t + 1].transpose(0, 1), [qpos], model)  # (H, 1, D)
        kt = _rope(k[keys].transpose(0, 1), kpos, model)  # (H, S, D)
        w = F.softmax(qt @ kt.transpose(-1, -2) / a.head_dim**0.5, dim=-1)
        out.append(w @ v[keys].transpose(0, 1))  # (H, 1, D)
    y = torch.cat(out, dim=1).transpose(0, 1).reshape(1, T, -1)
    return a.o_proj(y)


@torch.no_grad()
def sink_reference(model, ids, n_sink, W):
    """Logits (1, T, vocab) of StreamingLLM's attention pattern, with nothing cached."""
    x = model.embed_tokens(ids)
    for layer in model.layers:
        x = x + _attention(layer, layer.input_layernorm(x), model, n_sink, W)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return kvlib.load_model("tiny-llama")


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3", "tiny-llama-mqa"])
@pytest.mark.parametrize("n_sink", [0, 1, 4])
def test_sinks_equal_streamingllm_attention_teacher_forced(make_llama, teacher_forced, preset,
                                                           n_sink):
    model = make_llama(preset)
    W = 6
    seq = torch.randint(0, model.cfg.vocab_size, (1, n_sink + 3 * W + 2))
    model.set_kv_cache("sinks", window=W, n_sink=n_sink)
    with torch.no_grad():
        got = [model(seq[:, :1], use_cache=True)]
        got += [model(seq[:, t : t + 1], use_cache=True) for t in range(1, seq.shape[1])]
    got = torch.cat(got, dim=1)
    want = sink_reference(model, seq, n_sink, W)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt_len", [5, 6, 7, 8, 9, 30])  # around n_sink + W = 8, and far past
def test_sinks_greedy_tokens_equal_the_reference_around_the_edges(llama, prompt_len):
    n_sink, W = 2, 6
    prompt = torch.randint(0, llama.cfg.vocab_size, (1, prompt_len))
    got = kvlib.generate(llama, prompt, 12, cache="sinks", window=W, n_sink=n_sink).tokens
    seq = prompt
    for _ in range(12):  # the reference recomputes the whole pattern for every new token
        nxt = sink_reference(llama, seq, n_sink, W)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert got.tolist() == seq.tolist()


def test_before_the_cache_fills_every_strategy_gives_the_recompute_tokens(llama):
    prompt = torch.randint(0, llama.cfg.vocab_size, (1, 5))
    ref = kvlib.generate(llama, prompt, 11, cache=None).tokens  # 16 tokens in all
    for cache, opts in [("sinks", {"window": 12, "n_sink": 4}), ("sliding", {"window": 16}),
                        ("recompute", {"window": 16}), ("prealloc", {})]:
        assert kvlib.generate(llama, prompt, 11, cache=cache, **opts).tokens.equal(ref), cache


def test_recompute_runs_the_last_window_from_position_zero(llama):
    W = 5
    prompt = torch.randint(0, llama.cfg.vocab_size, (1, 9))
    got = kvlib.generate(llama, prompt, 6, cache="recompute", window=W).tokens
    seq = prompt
    for _ in range(6):
        llama.set_kv_cache("none")
        with torch.no_grad():
            nxt = llama(seq[:, -W:])[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert got.tolist() == seq.tolist()


def test_memory_is_flat_and_slots_hold_sinks_and_the_window(llama):
    llama.set_kv_cache("sinks", window=4, n_sink=2)
    ids = torch.randint(0, llama.cfg.vocab_size, (1, 1))
    sizes = []
    with torch.no_grad():
        for _ in range(20):
            llama(ids, use_cache=True)
            sizes.append(llama.kv_cache_nbytes)
    cache = llama.caches[0]
    assert cache.tokens_held == 6 and cache.get_seq_length() == 20 and cache.delta == 14
    assert len(set(sizes)) == 1  # allocated once, for 2 + 4 tokens, never grown
    L, H, D = llama.cfg.n_layers, llama.cfg.n_kv_heads, llama.cfg.head_dim
    assert sizes[0] == L * H * D * 4 * (2 * 6 + 2)  # keys and values of 6 slots, 2 unmoved sinks
    assert sorted(cache.slot_positions()) == [0, 1, 16, 17, 18, 19]
    assert cache.slot_positions()[2:] == [18, 19, 16, 17]  # position p in slot 2 + (p - 2) % 4


def test_rotations_add_up(llama):
    k = torch.randn(1, 2, 3, llama.cfg.head_dim)
    inv = llama.rope.inv_freq
    torch.testing.assert_close(rotate(rotate(k, inv, 5), inv, 7), rotate(k, inv, 12))
    torch.testing.assert_close(rotate(rotate(k, inv, 9), inv, -9), k)
    at3 = _rope(k, [3, 3, 3], llama)
    torch.testing.assert_close(rotate(at3, inv, 4), _rope(k, [7, 7, 7], llama), atol=1e-5,
                               rtol=1e-5)


def test_a_full_sink_cache_takes_one_token_at_a_time(llama):
    llama.set_kv_cache("sinks", window=4, n_sink=2)
    with torch.no_grad():
        llama(torch.zeros(1, 6, dtype=torch.long), use_cache=True)  # fills it exactly
        with pytest.raises(ValueError, match="one token per call"):
            llama(torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    long_prompt = torch.randint(0, llama.cfg.vocab_size, (1, 40))
    kvlib.generate(llama, long_prompt, 2, cache="sinks", window=4, n_sink=2)  # chunks it


def test_bad_sink_settings_are_clear_errors(llama, tiny):
    with pytest.raises(ValueError, match="needs a window"):
        llama.set_kv_cache("sinks", n_sink=4)
    with pytest.raises(ValueError, match="rotary positions"):
        tiny.set_kv_cache("sinks", window=8)
    with pytest.raises(ValueError, match="at most"):
        llama.set_kv_cache("sinks", window=llama.cfg.context_length, n_sink=4)
    with pytest.raises(ValueError, match="n_sink"):
        SinkCache(window=4, n_sink=-1, inv_freq=llama.rope.inv_freq)
    with pytest.raises(ValueError, match="inv_freq"):
        SinkCache(window=4)


def test_perplexity_streams_through_sinks(llama):
    ids = torch.randint(0, llama.cfg.vocab_size, (1, 30))
    got = kvlib.perplexity(llama, ids, cache="sinks", window=6, n_sink=2)
    want = sink_reference(llama, ids, 2, 6)[0, :-1]
    ref_nll = F.cross_entropy(want, ids[0, 1:], reduction="none")
    torch.testing.assert_close(got.nll, ref_nll, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("T", [5, 12, 13, 30])  # shorter than, equal to and past the window + 1
def test_recompute_perplexity_batched_equals_streamed(llama, T):
    ids = torch.randint(0, llama.cfg.vocab_size, (2, T))
    fast = kvlib.perplexity(llama, ids, cache="recompute", window=11, batch_size=1)
    slow = kvlib.perplexity(llama, ids, cache="recompute", window=11, stream=True)
    assert fast.nll.shape == (2 * (T - 1),)
    torch.testing.assert_close(fast.nll, slow.nll, atol=1e-4, rtol=1e-4)
