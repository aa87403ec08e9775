"""Every cache against recomputation: logits within 1e-5, greedy tokens identical."""

import pytest
import torch

import kvlib

CACHES = [("concat", None), ("prealloc", None), ("sliding", None)]  # sliding: window = context


def windowed_reference(model, seq, window):
    """Logits of a no-cache model whose attention is masked to the last ``window`` positions."""
    model.set_kv_cache("none", window=window)
    with torch.no_grad():
        return model(seq, use_cache=True)


@pytest.mark.parametrize("strategy,window", CACHES)
@pytest.mark.parametrize("batch", [1, 2])
def test_teacher_forced_logits_tiny(teacher_forced, tiny, strategy, window, batch):
    seq = torch.randint(0, 50257, (batch, 72), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny(seq)  # (B, 72, vocab), plain causal attention
    for prompt_len in (1, 8):
        got = teacher_forced(tiny, seq, strategy, window, prompt_len)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["concat", "prealloc", "sliding"])
def test_teacher_forced_logits_gpt2(teacher_forced, gpt2, strategy):
    seq = torch.randint(0, 50257, (1, 38), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = gpt2(seq)
    got = teacher_forced(gpt2, seq, strategy, prompt_len=6)  # 32 decode steps after the prompt
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def _min_margin(model, tokens, prompt_len):
    """Smallest gap between the best and second-best logit over the greedy steps."""
    with torch.no_grad():
        logits = model(tokens[:, :-1])[:, prompt_len - 1 :]
    top2 = logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).min().item()


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_identical_tiny(tiny, batch):
    prompt = torch.randint(0, 50257, (batch, 5), generator=torch.Generator().manual_seed(3))
    ref = kvlib.generate(tiny, prompt, max_new_tokens=100)
    assert ref.tokens.shape == (batch, 105)
    # The comparison means something only if no step is a near-tie.
    assert _min_margin(tiny, ref.tokens, 5) > 1e-4
    for strategy, window in [("concat", None), ("prealloc", None), ("sliding", 256)]:
        out = kvlib.generate(tiny, prompt, max_new_tokens=100, cache=strategy, window=window)
        assert torch.equal(out.tokens, ref.tokens), strategy
        assert len(out.step_times) == 99 and out.prefill_time > 0


def test_issue_snippet_gpt2(gpt2):
    prompt = torch.tensor([[15496, 11, 314, 716, 257, 2746]])
    ref = kvlib.generate(gpt2, prompt, max_new_tokens=50)
    for cache in ("concat", "prealloc", "sliding"):
        out = kvlib.generate(gpt2, prompt, max_new_tokens=50, cache=cache,
                             window=1024 if cache == "sliding" else None)
        assert torch.equal(out.tokens, ref.tokens)
    assert kvlib.decode(ref.tokens[0].tolist()).startswith("Hello, I am a model")


# --- sliding window -----------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len", [5, 16, 40])  # shorter than, equal to, longer than W
def test_sliding_logits_match_windowed_attention(teacher_forced, tiny, prompt_len):
    W = 16
    seq = torch.randint(0, 50257, (2, 120), generator=torch.Generator().manual_seed(4))
    ref = windowed_reference(tiny, seq, W)
    got = teacher_forced(tiny, seq, "sliding", W, prompt_len)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # The window really bites: full attention gives other logits past position W.
    with torch.no_grad():
        full = tiny(seq)
    assert (full[:, W + 1 :] - ref[:, W + 1 :]).abs().max() > 1e-3


def test_sliding_multi_token_updates_after_decoding(tiny):
    """Prefill, a few single steps, then chunks of several tokens: still the windowed model."""
    W = 12
    seq = torch.randint(0, 50257, (1, 90), generator=torch.Generator().manual_seed(5))
    ref = windowed_reference(tiny, seq, W)
    tiny.set_kv_cache("sliding", window=W)
    chunks, out, t = [7, 1, 1, 1, 5, 20, 1, 3, 30, 1, 1, 19], [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(tiny(seq[:, t : t + n], use_cache=True))
            t += n
    assert t == 90
    torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt_len", [6, 30])
def test_sliding_generation_far_past_window(tiny, prompt_len):
    W = 16
    prompt = torch.randint(0, 50257, (2, prompt_len), generator=torch.Generator().manual_seed(6))
    ref = kvlib.generate(tiny, prompt, max_new_tokens=150, window=W)  # no cache, masked
    out = kvlib.generate(tiny, prompt, max_new_tokens=150, cache="sliding", window=W)
    assert torch.equal(out.tokens, ref.tokens)
    full = kvlib.generate(tiny, prompt, max_new_tokens=150)
    assert not torch.equal(full.tokens, out.tokens)  # the window changed the text


def test_sliding_slots_turn_over():
    cache = kvlib.SlidingWindowCache(window=4)
    k = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1).expand(1, 1, 6, 2).contiguous()
    cache.update(k[:, :, :3], k[:, :, :3])
    assert cache.slot_positions() == [0, 1, 2, -1]
    cache.update(k[:, :, 3:4], k[:, :, 3:4])
    cache.update(k[:, :, 4:5], k[:, :, 4:5])  # overwrites the oldest, position 0 in slot 0
    assert cache.slot_positions() == [4, 1, 2, 3]
    assert cache.keys[0, 0, :, 0].tolist() == [4.0, 1.0, 2.0, 3.0]
    keys, _ = cache.update(k[:, :, 5:6], k[:, :, 5:6])
    assert sorted(keys[0, 0, :, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]
    assert cache.get_seq_length() == 6


# --- buffers, reset, memory ---------------------------------------------------------------------

@pytest.mark.parametrize("strategy,window", [("concat", None), ("prealloc", None), ("sliding", 8)])
def test_state_dict_never_holds_cache(make_model, strategy, window):
    model = make_model()
    keys_before = set(model.state_dict())
    assert not any("kv_cache" in k for k in keys_before)
    kvlib.generate(model, torch.tensor([[1, 2, 3]]), 20, cache=strategy, window=window)
    assert set(model.state_dict()) == keys_before
    assert model.kv_cache_nbytes > 0  # the cache is there, just not in the state dict
    names = [n for n, _ in model.named_buffers()]
    assert names and all("kv_cache" in n for n in names)


def test_reset_gives_same_result_as_fresh_model(make_model):
    prompt_a = torch.tensor([[10, 20, 30, 40]])
    prompt_b = torch.tensor([[7, 8, 9]])
    used = make_model()
    used.set_kv_cache("concat")
    with torch.no_grad():
        used(prompt_a, use_cache=True)
        used(torch.tensor([[5]]), use_cache=True)
        used.reset_kv_cache()
        assert used.pos == 0 and used.kv_cache_nbytes == 0
        after_reset = used(prompt_b, use_cache=True)
        fresh = make_model()
        fresh.set_kv_cache("concat")
        torch.testing.assert_close(after_reset, fresh(prompt_b, use_cache=True), atol=0, rtol=0)
    a = kvlib.generate(used, prompt_b, 30, cache="prealloc")
    b = kvlib.generate(used, prompt_b, 30, cache="prealloc")
    assert torch.equal(a.tokens, b.tokens)


def test_without_reset_positions_continue(tiny):
    tiny.set_kv_cache("concat")
    with torch.no_grad():
        tiny(torch.tensor([[1, 2, 3]]), use_cache=True)
        assert tiny.pos == 3 and tiny.caches[0].get_seq_length() == 3
        tiny(torch.tensor([[4]]), use_cache=True)
    assert tiny.pos == 4


def test_prealloc_buffers_keep_their_address(tiny):
    tiny.set_kv_cache("prealloc", max_len=64)
    ptrs = None
    with torch.no_grad():
        tiny(torch.tensor([[1, 2, 3, 4]]), use_cache=True)
        ptrs = [(c.keys.data_ptr(), c.values.data_ptr()) for c in tiny.caches]
        nbytes = tiny.kv_cache_nbytes
        for t in range(40):
            tiny(torch.tensor([[t]]), use_cache=True)
            assert [(c.keys.data_ptr(), c.values.data_ptr()) for c in tiny.caches] == ptrs
            assert tiny.kv_cache_nbytes == nbytes
        tiny.reset_kv_cache()  # a reset keeps the buffers for the next text
        tiny(torch.tensor([[9, 9]]), use_cache=True)
    assert [(c.keys.data_ptr(), c.values.data_ptr()) for c in tiny.caches] == ptrs
    cfg = tiny.cfg
    assert nbytes == cfg.n_layers * 2 * 1 * cfg.n_heads * 64 * cfg.head_dim * 4


def test_concat_grows_one_token_per_step_and_sliding_stays_flat(tiny):
    cfg = tiny.cfg
    per_token = cfg.n_layers * 2 * cfg.n_heads * cfg.head_dim * 4  # bytes, float32, batch 1
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    steps = list(kvlib.generate_stream(tiny, prompt, 40, cache="concat"))
    # Step i has fed 5 + i tokens into the cache (the newest token is not fed yet).
    assert [s.cache_nbytes for s in steps] == [(5 + i) * per_token for i in range(40)]
    assert [s.cache_tokens for s in steps] == [5 + i for i in range(40)]
    W = 10
    steps = list(kvlib.generate_stream(tiny, prompt, 40, cache="sliding", window=W))
    assert {s.cache_nbytes for s in steps} == {W * per_token}
    assert [s.cache_tokens for s in steps] == [min(5 + i, W) for i in range(40)]
    steps = list(kvlib.generate_stream(tiny, prompt, 40, cache=None))
    assert {s.cache_nbytes for s in steps} == {0}


# --- devices and dtypes -------------------------------------------------------------------------

@pytest.mark.kernels
def test_bfloat16_on_cpu_and_caches_follow_dtype(teacher_forced, make_model):
    model = make_model().to(torch.bfloat16)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    ref = kvlib.generate(model, prompt, 30)
    for strategy, window in [("concat", None), ("prealloc", None), ("sliding", 64)]:
        out = kvlib.generate(model, prompt, 30, cache=strategy, window=window)
        assert all(c.keys.dtype == torch.bfloat16 for c in model.caches)
        assert out.tokens.shape == ref.tokens.shape
    # bf16 rounding differs between the two paths, so compare logits loosely, tokens not at all
    seq = ref.tokens
    with torch.no_grad():
        full = model(seq).float()
    cached = teacher_forced(model, seq, "prealloc", prompt_len=6).float()
    torch.testing.assert_close(cached, full, atol=5e-2, rtol=0)


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
    pytest.param("mps", marks=pytest.mark.skipif(not torch.backends.mps.is_available(),
                                                 reason="no MPS")),
])
def test_accelerator_matches_cpu(make_model, device):
    model = make_model().to(device)
    prompt = torch.tensor([[1, 2, 3, 4]], device=device)
    ref = kvlib.generate(model, prompt, 40)
    for strategy, window in [("concat", None), ("prealloc", None), ("sliding", 256)]:
        out = kvlib.generate(model, prompt, 40, cache=strategy, window=window)
        assert out.tokens.device.type == device
        assert all(c.keys.device.type == device for c in model.caches)
        assert torch.equal(out.tokens, ref.tokens)


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


def test_prealloc_max_len_not_positive():
    with pytest.raises(ValueError, match="max_len must be a positive"):
        kvlib.PreallocCache(0)


# --- "paged" on its own: one storage for every layer, blocks taken as the text grows ------------

def _paged_model(make_model, make_llama, preset):
    return make_llama(preset) if "llama" in preset else make_model(preset)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_paged_equals_recomputation(make_model, make_llama, preset, block_size):
    model = _paged_model(make_model, make_llama, preset)
    prompts = torch.randint(0, model.cfg.vocab_size, (2, 5),
                            generator=torch.Generator().manual_seed(4))
    for prompt in (prompts[:1], prompts):  # a single prompt, an equal-length batch
        ref = kvlib.generate(model, prompt, 30)
        assert _min_margin(model, ref.tokens, 5) > 1e-4
        out = kvlib.generate(model, prompt, 30, cache="paged", block_size=block_size)
        assert torch.equal(out.tokens, ref.tokens)
    seq = torch.randint(0, model.cfg.vocab_size, (2, 40),
                        generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(seq)
        model.set_kv_cache("paged", block_size=block_size)
        got = torch.cat([model(seq[:, :6], use_cache=True)]
                        + [model(seq[:, t : t + 1], use_cache=True) for t in range(6, 40)], dim=1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_paged_blocks_are_taken_as_the_rows_grow(tiny):
    kvlib.generate(tiny, torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]), 10, cache="paged",
                   block_size=4)  # 5 + 9 tokens cached per row: 4 blocks each, in turn
    caches = tiny.caches
    pager = caches[0].pager
    assert pager.tables == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert all(c.storage is caches[0].storage and c.batch is caches[0].batch for c in caches)
    assert tiny.pos == 14 and caches[0].capacity == 16  # max_len = 15 tokens, whole blocks
    cfg = tiny.cfg
    per_token = 2 * cfg.n_heads * cfg.head_dim * 4  # one layer, float32
    assert caches[0].nbytes == 2 * 16 * per_token
    assert tiny.kv_cache_nbytes == cfg.n_layers * caches[0].nbytes


def test_paged_full_and_bad_options(tiny):
    tiny.set_kv_cache("paged", block_size=4, max_len=8)
    with torch.no_grad():
        tiny(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), use_cache=True)
        with pytest.raises(RuntimeError, match=r"PagedCache is full: each row holds 8 of 8"):
            tiny(torch.tensor([[9]]), use_cache=True)
        tiny.set_kv_cache("paged", block_size=4)
        tiny(torch.tensor([[1, 2], [3, 4]]), use_cache=True)
        with pytest.raises(ValueError, match=r"batch size 2.*reset_kv_cache.* before a new batch"):
            tiny(torch.tensor([[5]]), use_cache=True)
    with pytest.raises(ValueError, match="block_size must be a positive"):
        tiny.set_kv_cache("paged", block_size=0)
    with pytest.raises(ValueError, match="takes no option bits.*block_size"):
        tiny.set_kv_cache("paged", bits=8)
    with pytest.raises(ValueError, match="prompts of different lengths.*kvlib.Engine"):
        kvlib.generate(tiny, [torch.tensor([1, 2, 3]), torch.tensor([4])], 2, cache="paged")
