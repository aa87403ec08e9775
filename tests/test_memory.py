"""kvlib.memory: the cache-size formula matches kvlib's caches and the published model sizes."""

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
