"""kvlib.caches.compressed: int8 and int4 keys and values, H2O eviction, the bfloat16 cache."""

from __future__ import annotations

import pytest
import torch

import kvlib
from kvlib.caches.compressed import (
    SCALE_DTYPE,
    EvictCache,
    QuantizedCache,
    dequantize,
    pack,
    pack_int4,
    quantize,
    quantized_nbytes,
    unpack,
    unpack_int4,
)


@pytest.fixture(scope="module")
def mini():
    return kvlib.load_model("mini-llama")


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return kvlib.LlamaModel(kvlib.LlamaConfig.from_preset("tiny-llama")).eval()


@pytest.fixture(scope="module")
def tiny_gpt2():
    torch.manual_seed(0)
    return kvlib.GPTModel(kvlib.GPTConfig.from_preset("tiny")).eval()


def _ids(model, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (1, T), generator=g)


# ---- quantize / dequantize ----------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim,group", [(2, 16), (3, 8), (3, 32)])
def test_dequantized_within_half_a_step(bits, dim, group):
    g = torch.Generator().manual_seed(bits + dim)
    x = torch.randn(2, 3, 32, 32, generator=g) * 4
    x[..., 5] *= 30  # an outlier channel
    codes, scale, zero = quantize(x, bits, group, dim=dim)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scale.dtype == zero.dtype == SCALE_DTYPE
    assert scale.shape[dim] == x.shape[dim] // group
    back = dequantize(codes, scale, zero, group, dim=dim)
    bound = scale.float().repeat_interleave(group, dim=dim) / 2  # |x - deq| <= scale / 2
    eps = 1e-6 * (x.abs() + 1)  # float32 arithmetic
    assert ((x - back).abs() <= bound + eps).all()


def test_a_constant_group_comes_back():
    x = torch.full((1, 1, 8, 4), 0.75)
    back = dequantize(*quantize(x, 4, 8, dim=2), 8, dim=2)
    assert torch.allclose(back, x, atol=1e-4)


def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (2, 3, 5, 8), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (2, 3, 5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("bits", [4, 2])
def test_packing_round_trips_and_puts_code_j_in_its_bits(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 8), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (2, 3, 5, 8 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)
    one = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack(one, 2).item() == 1 | 2 << 2 | 3 << 4  # code j at bits 2j


# ---- the quantized cache ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_residual_covering_the_text_gives_the_full_precision_tokens(mini, tiny_llama, tiny_gpt2,
                                                                     bits):
    for model in (mini, tiny_llama, tiny_gpt2):
        prompt = _ids(model, 12)
        ref = kvlib.generate(model, prompt, 30, cache="concat").tokens
        out = kvlib.generate(model, prompt, 30, cache="quantized", bits=bits,
                             group_size=8, residual=64)
        assert torch.equal(out.tokens, ref)
        assert model.caches[0].quantized_tokens == 0


def test_quantized_cache_stores_blocks_and_returns_every_token(tiny_llama):
    cache = QuantizedCache(bits=4, group_size=4, residual=3)
    k, v = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    keys, values = cache.update(k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)  # a call sees its own tokens exactly
    assert cache.quantized_tokens == 4 and cache.tail_keys.shape[2] == 6  # 10 - 3 = 7: one block
    k1, v1 = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    keys, values = cache.update(k1, v1)
    assert keys.shape[2] == 11 and cache.get_seq_length() == 11
    assert torch.equal(keys[:, :, 4:], torch.cat([k[:, :, 4:], k1], dim=2))  # the tail, exact
    assert (keys[:, :, :4] - k[:, :, :4]).abs().max() < 0.5  # the store, int4
    assert cache.quantized_tokens == 8  # the tail reached 3 + 4: a second block left it
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    keys, _ = cache.update(k[:, :, :2], v[:, :, :2])
    assert torch.equal(keys, k[:, :, :2])


@pytest.mark.parametrize("bits,group,residual,T", [(8, 32, 0, 256), (4, 32, 0, 256),
                                                   (4, 16, 32, 100), (8, 8, 5, 37),
                                                   (2, 32, 0, 256), (2, 16, 32, 100)])
def test_nbytes_matches_the_formula(mini, bits, group, residual, T):
    ids = kvlib.held_out("mini-llama")[:, :T]
    mini.set_kv_cache("quantized", bits=bits, group_size=group, residual=residual)
    with torch.no_grad():
        mini(ids[:, :1], use_cache=True)
        for t in range(1, T):
            mini(ids[:, t : t + 1], use_cache=True)
    c = mini.cfg
    want = quantized_nbytes(T, c.n_kv_heads, c.head_dim, bits, group, residual)
    assert mini.caches[0].nbytes == want
    # by hand: codes, float16 scale + zero per group, the full-precision tail
    q = (T - residual) // group * group
    by_hand = 2 * c.n_kv_heads * c.head_dim * (q * bits // 8 + (T - q) * 4) \
        + 2 * 2 * 2 * c.n_kv_heads * c.head_dim * q // group
    assert want == by_hand
    mini.reset_kv_cache()


def test_bytes_at_full_context_meet_or_miss_the_ratios(mini):
    c = mini.cfg
    fp32 = 2 * c.n_kv_heads * c.head_dim * 4 * c.context_length
    int8 = quantized_nbytes(c.context_length, c.n_kv_heads, c.head_dim, 8, 32) / fp32
    int4 = quantized_nbytes(c.context_length, c.n_kv_heads, c.head_dim, 4, 32) / fp32
    assert int8 == pytest.approx(1.125 / 4) and int4 == pytest.approx(0.625 / 4)


@pytest.mark.kernels
def test_quantized_logits_stay_close(mini):
    ids = kvlib.held_out("mini-llama")[:, :128]
    ref = kvlib.perplexity(mini, ids, cache="concat")
    q8 = kvlib.perplexity(mini, ids, cache="quantized", bits=8)
    assert abs(q8.perplexity / ref.perplexity - 1) < 0.01
    assert (q8.top1 == ref.top1).float().mean() > 0.95


# ---- eviction -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mini", "tiny_llama", "tiny_gpt2"])
def test_evict_with_a_budget_over_the_text_equals_the_full_cache(name, request):
    model = request.getfixturevalue(name)
    prompt = _ids(model, 10)
    ref = kvlib.generate(model, prompt, 30, cache="concat").tokens
    assert torch.equal(kvlib.generate(model, prompt, 30, cache="evict", budget=40).tokens, ref)
    ids = _ids(model, 40, seed=1)
    a = kvlib.perplexity(model, ids, cache="concat")
    b = kvlib.perplexity(model, ids, cache="evict", budget=40, n_sink=2, window=8)
    assert torch.allclose(a.nll, b.nll, atol=1e-4) and torch.equal(a.top1, b.top1)


def test_evict_keeps_sinks_window_and_heavy_hitters(tiny_llama):
    torch.manual_seed(0)
    budget, n_sink, window = 12, 2, 4
    tiny_llama.set_kv_cache("evict", budget=budget, n_sink=n_sink, window=window)
    ids = _ids(tiny_llama, 40)
    with torch.no_grad():
        for t in range(40):
            tiny_llama(ids[:, t : t + 1], use_cache=True)
    for cache in tiny_llama.caches:
        assert cache.tokens_held == budget and cache.get_seq_length() == 40
        held = cache.held_positions()  # (1, H, budget)
        for row in held[0].tolist():
            assert len(set(row)) == budget
            assert row[:n_sink] == list(range(n_sink))  # the sinks
            assert row[-window:] == list(range(40 - window, 40))  # the recent window
    tiny_llama.reset_kv_cache()
    assert tiny_llama.caches[0].get_seq_length() == 0


def test_evict_drops_the_least_attended_token():
    cache = EvictCache(budget=5, n_sink=1, window=2)
    k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    cache.update(k, v)
    weights = torch.tensor([0.4, 0.05, 0.5, 0.3, 0.02]).view(1, 1, 1, 5)
    cache.observe(weights)  # the window after the next token: positions 4 and 5
    cache.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
    assert sorted(cache.slot_positions()) == [0, 2, 3, 4, 5]  # position 1 (0.05) went


def test_evict_nbytes_counts_positions_and_scores(mini):
    mini.set_kv_cache("evict", budget=64, n_sink=4, window=16)
    with torch.no_grad():
        mini(kvlib.held_out("mini-llama")[:, :64], use_cache=True)
    c = mini.cfg
    per_slot = c.n_kv_heads * (2 * c.head_dim * 4 + 4 + 4)  # keys, values, int32 position, score
    assert mini.caches[0].nbytes == 64 * per_slot
    mini.reset_kv_cache()


# ---- the bfloat16 cache -------------------------------------------------------------------------

def test_bf16_cache_holds_half_the_bytes(mini):
    ids = kvlib.held_out("mini-llama")[:, :64]
    kvlib.perplexity(mini, ids, cache="concat")
    mini.set_kv_cache("bf16")
    with torch.no_grad():
        mini(ids, use_cache=True)
    c = mini.cfg
    assert mini.caches[0].nbytes == 2 * c.n_kv_heads * c.head_dim * 2 * 64
    mini.reset_kv_cache()


# ---- the interface every cache keeps --------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: QuantizedCache(8, 4, residual=2),
                                  lambda: QuantizedCache(4, 4),
                                  lambda: EvictCache(budget=64, n_sink=2, window=8)])
def test_interface_reset_and_length(make):
    cache = make()
    assert cache.get_seq_length() == 0
    k, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    keys, _ = cache.update(k, v)
    assert keys.shape[2] == 9 and torch.equal(keys, k)
    keys, _ = cache.update(k[:, :, :1], v[:, :, :1])
    assert keys.shape[2] == 10 and cache.get_seq_length() == 10
    cache.reset()
    assert cache.get_seq_length() == 0
    keys, _ = cache.update(k[:, :, :3], v[:, :, :3])
    assert torch.equal(keys, k[:, :, :3])


def test_check_cache_passes_both_caches_with_room():
    """With room for the whole text, both caches are the plain cache: check_cache's tokens and
    logits agree. The evict cache also holds an int32 position and a float32 score per slot and
    head, which check_cache's keys-and-values byte count does not expect: it fails there only."""
    class Roomy(QuantizedCache):
        def __init__(self) -> None:
            super().__init__(bits=4, group_size=4, residual=1024)

    class RoomyEvict(EvictCache):
        def __init__(self) -> None:
            super().__init__(budget=512, n_sink=4, window=16)

    assert len(kvlib.check_cache(Roomy, verbose=False)) >= 6
    with pytest.raises(kvlib.CacheCheckError, match="nbytes is 139264, expected 131072"):
        kvlib.check_cache(RoomyEvict, verbose=False)  # 512 slots x 2 heads x 8 bytes more


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    ({"bits": 1}, "bits must be 8, 4 or 2"),
    ({"bits": 3}, "bits must be 8, 4 or 2"),
    ({"bits": 8, "group_size": 12}, r"group_size must divide head_dim \(32\).*try one of"),
    ({"bits": 4, "group_size": 0}, "group_size must divide head_dim"),
])
def test_bad_quantized_options_say_what_to_do(mini, options, message):
    with pytest.raises(ValueError, match=message):
        kvlib.generate(mini, _ids(mini, 4), 2, cache="quantized", **options)


def test_quantized_takes_no_window(mini):
    with pytest.raises(ValueError, match="residual="):
        mini.set_kv_cache("quantized", window=16)


@pytest.mark.parametrize("options,message", [
    ({"budget": 10, "n_sink": 4, "window": 8}, r"make budget at least 12"),
    ({"n_sink": 4, "window": 8}, "needs a budget"),
])
def test_bad_evict_options_say_what_to_do(mini, options, message):
    with pytest.raises(ValueError, match=message):
        kvlib.generate(mini, _ids(mini, 4), 2, cache="evict", **options)
    with pytest.raises(ValueError, match="make budget at least 12"):
        EvictCache(budget=10, n_sink=4, window=8)


def test_a_full_evict_cache_takes_one_token_at_a_time():
    cache = EvictCache(budget=8, n_sink=1, window=2)
    cache.update(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4))
    with pytest.raises(ValueError, match="one token per call"):
        cache.update(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))


# ---- the benchmark ------------------------------------------------------------------------------

def test_compress_bench_writes_json_and_its_report(tmp_path, capsys):
    from kvlib.bench import main

    out = tmp_path / "compress.json"
    main(["compress", "--windows", "1", "--repeats", "1", "--no-gpt2", "--no-hf", "--threads",
          "1", "--out", str(out), "--no-progress"])
    import json

    d = json.loads(out.read_text())
    labels = [c["label"] for c in d["caches"]]
    assert labels[0] == "fp32 (full)" and "int4 + residual 32" in labels and "evict 32" in labels
    by = {c["label"]: c for c in d["caches"]}
    assert by["int8"]["bytes_ratio"] == pytest.approx(1.125 / 4)
    assert by["int4"]["bytes_ratio"] == pytest.approx(0.625 / 4)
    assert [t["met"] for t in d["targets"]] == [False, True, True, True]
    text = capsys.readouterr().out
    assert "## Compressing the cache" in text and "| int8 bytes at the full context" in text


# ---- the widget ---------------------------------------------------------------------------------

def test_compression_explorer_measures_and_leaves_the_model_as_it_was(mini):
    pytest.importorskip("ipywidgets")
    from kvlib.widgets import CompressionExplorer

    rows = kvlib.held_out("mini-llama")[:, :64]
    mini.set_kv_cache("sliding", window=8)
    w = CompressionExplorer(mini, rows, bits=4, group_size=32, budget=32)
    first = w.image.value
    assert w.result.quantized_nbytes == mini.cfg.n_layers * quantized_nbytes(
        64, mini.cfg.n_kv_heads, mini.cfg.head_dim, 4, 32)
    w.bits.value = 8
    assert w.result.bits == 8 and w.image.value != first
    assert w.result.errors["keys per channel"] < w.result.errors["keys per token"]
    assert type(mini.caches[0]).__name__ == "SlidingWindowCache" and mini.caches[0].window == 8
    mini.set_kv_cache("concat")
