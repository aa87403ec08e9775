"""kvlib.memory: the cache-size formula matches kvlib's caches and the published model sizes."""

import pytest
import torch

import kvlib
from kvlib.memory import MODELS, get_spec, gpt2_params


def test_gpt2_parameter_counts_match_the_model(tiny, gpt2):
    for model in (tiny, gpt2):
        assert gpt2_params(model.cfg) == sum(p.numel() for p in model.parameters())
    assert MODELS["gpt2"].n_params == sum(p.numel() for p in gpt2.parameters())


def test_published_model_sizes():
    # Parameter counts from each model card / safetensors index; the formula must reproduce them.
    assert MODELS["llama-3-8b"].n_params == 8_030_261_248
    assert MODELS["llama-3-70b"].n_params == 70_553_706_496
    assert MODELS["qwen3-0.6b"].n_params == 596_049_920
    assert MODELS["qwen3-8b"].n_params == 8_190_735_360
    llama = MODELS["llama-3-8b"]  # 2 x 32 x 8 x 128 x 2 bytes = 128 KiB per token in bf16
    assert llama.cache_bytes_per_token("bfloat16") == 128 * 1024
    assert llama.cache_bytes(8192, batch=1) == 2**30
    assert llama.mha_cache_bytes(8192) == 4 * llama.cache_bytes(8192)  # 32 query / 8 kv heads


def test_cache_bytes_formula_matches_kvlib(tiny, prompt, make_model):
    ids = torch.tensor([kvlib.encode(prompt)])
    kvlib.generate(tiny, ids, 4, cache="concat")
    tokens = tiny.caches[0].get_seq_length()
    assert tiny.kv_cache_nbytes == get_spec(tiny.cfg).cache_bytes(tokens, dtype="float32")
    half = make_model("tiny").to(torch.bfloat16)
    kvlib.generate(half, ids, 4, cache="concat")
    assert half.kv_cache_nbytes == get_spec(half.cfg).cache_bytes(tokens, dtype="bfloat16")


def test_todays_layouts_reproduce_the_published_figures():
    from dataclasses import replace

    from kvlib.memory import ARCHITECTURES as A
    from kvlib.memory import mla_reduction, with_layout

    v3 = A["deepseek-v3"]  # 61 layers x (512 + 64) numbers, bfloat16
    assert v3.cache_bytes_per_token() == 61 * 576 * 2
    decompressed = 128 * (192 + 128)  # every head's key and value
    assert 1 - v3.values_per_token_layer / decompressed == pytest.approx(0.9859, abs=1e-4)
    # DeepSeek-V2 against DeepSeek 67B: 93.3% with the latent at ~6 bits, as deployed
    assert round(100 * mla_reduction(), 1) == 93.3
    assert round(100 * mla_reduction(bits=16), 1) == 82.2  # the layout alone
    gemma = A["gemma-3-27b"]  # 5 local (1024) : 1 global, 62 layers: 10 global
    assert gemma.cache_bytes(1024) == with_layout(gemma, None).cache_bytes(1024)
    assert gemma.cache_bytes(32768) / with_layout(gemma, None).cache_bytes(32768) == \
        pytest.approx((10 * 32768 + 52 * 1024) / (62 * 32768))
    # Gemma 3's report: a 2B model at 32k, about 60% of the weights global-only, under 15% at
    # 1:3 with window 1024. Its shapes are not published; Gemma 2 2B's give 67% and 17%.
    two_b = replace(A["llama-3-70b"], name="gemma-2-2b", n_layers=26, n_heads=8, n_kv_heads=4,
                    head_dim=256, n_params=2_614_341_888)
    assert with_layout(two_b, None).kv_overhead(32768) == pytest.approx(0.668, abs=1e-3)
    assert with_layout(two_b, 3, 1024).kv_overhead(32768) == pytest.approx(0.170, abs=1e-3)
    oss = A["gpt-oss-20b"]  # half the layers slide over 128 tokens: about half the cache
    assert oss.cache_bytes(131072) / with_layout(oss, None).cache_bytes(131072) == \
        pytest.approx((12 * 131072 + 12 * 128) / (24 * 131072))
    with pytest.raises(ValueError, match="window"):
        with_layout(gemma, 5)
