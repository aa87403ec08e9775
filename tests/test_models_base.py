"""What every model shares (kvlib.models.base): choosing a cache strategy, and its checks."""

import pytest
import torch

import kvlib

P = torch.tensor([[1, 2, 3]])
# Two bfloat16 kernels that round differently agree within one bfloat16 epsilon (2**-7), relative
# and absolute (these logits are of order 1); measured: at most 1.3e-4 apart without AVX-512.
BF16_KERNELS = {"rtol": 2**-7, "atol": 2**-7}


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
    with pytest.raises(ValueError, match="window applies to .*'sliding'.*not 'prealloc'"):
        kvlib.generate(tiny, P, 5, cache="prealloc", window=4)


@pytest.mark.kernels
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "tiny-qwen3"])
def test_weights_are_laid_out_for_the_dtype(preset):
    """float32 on a CPU: matrices transposed in memory; bfloat16: row-major. Same values, same
    shapes, the head still tied, and the logits of a plain cast within bfloat16's rounding: the two
    layouts may take different bfloat16 kernels (they do without AMX), which round differently."""
    f32 = kvlib.load_model(preset, seed=1)
    bf16 = kvlib.load_model(preset, seed=1, dtype=torch.bfloat16)
    for model, transposed in ((f32, True), (bf16, False)):
        for module in model.weight_matrices():
            w = module.weight
            assert (w.stride() == (1, w.shape[0])) is transposed, (preset, type(module))
            assert w.t().is_contiguous() is transposed
        if getattr(model.cfg, "tie_embeddings", True):
            assert model.lm_head.weight is model.weight_matrices()[-1].weight
    cast = kvlib.load_model(preset, seed=1).to(torch.bfloat16)  # transposed, not re-arranged
    assert all(torch.equal(a, b) for a, b in zip(bf16.parameters(), cast.parameters(),
                                                 strict=True))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(bf16(ids), cast(ids), **BF16_KERNELS)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_logits_at_gives_those_tokens_logits(make_model, make_llama, preset):
    model = (make_model if preset == "tiny" else make_llama)(preset, seed=0)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    at = torch.tensor([0, 4, 8])
    with torch.no_grad():
        full, some = model(ids), model(ids, logits_at=at)
    assert some.shape == (2, 3, model.cfg.vocab_size)
    torch.testing.assert_close(some, full[:, at], rtol=1e-5, atol=1e-5)
