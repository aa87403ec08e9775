"""Beam search (kvlib.beam_search, generate(num_beams=k)): transformers' beams on the same
weights, through every cache that can reorder its rows."""

import pytest
import torch

import kvlib
from kvlib.bench.runners import hf_twin

REORDERING = [None, "concat", "prealloc", "bf16", "sliding", "quantized"]


def _hf_beams(model, ids, n, k):
    hf = hf_twin(model)
    hf.generation_config.eos_token_id = None  # no end token: every beam runs to n tokens
    with torch.no_grad():
        return hf.generate(ids, max_new_tokens=n, num_beams=k, do_sample=False,
                           pad_token_id=0, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("num_beams", [2, 4])
def test_beams_are_transformers_beams(make_model, make_llama, preset, num_beams, one_thread):
    model = (make_model if preset == "tiny" else make_llama)(preset, seed=0)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(5))
    want = _hf_beams(model, ids, 12, num_beams)
    got = kvlib.generate(model, ids, 12, cache="prealloc", num_beams=num_beams)
    assert got.tokens.tolist() == want.tolist()
    greedy = kvlib.generate(model, ids, 12, cache="prealloc")
    assert kvlib.generate(model, ids, 12, num_beams=1).tokens.tolist() == greedy.tokens.tolist()


@pytest.mark.parametrize("cache", REORDERING)
def test_every_cache_that_reorders_gives_the_same_beams(make_llama, cache, one_thread):
    model = make_llama("tiny-llama", seed=0)
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(6))
    opts = {"window": 8} if cache in (None, "sliding") else {}
    if cache == "quantized":  # the reference: the same rounding, so compare against concat
        opts = {"bits": 8, "residual": 64}  # everything stays in the full-precision tail
    ref = kvlib.beam_search(model, ids, 16, 3, cache=None, window=opts.get("window"))
    beams, scores, times = kvlib.beam_search(model, ids, 16, 3, cache=cache, **opts)
    assert beams.tolist() == ref[0].tolist()
    assert torch.allclose(scores, ref[1], atol=1e-4)
    assert (scores[:, :-1] >= scores[:, 1:]).all() and len(times) == 16


def test_beam_search_refuses_what_it_cannot_do(make_llama):
    model = make_llama("tiny-llama", seed=0)
    ids = torch.randint(0, 1000, (1, 6))
    with pytest.raises(ValueError, match="cannot reorder"):
        kvlib.generate(model, ids, 4, cache="paged", num_beams=2)
    with pytest.raises(ValueError, match="at least 1"):
        kvlib.generate(model, ids, 4, num_beams=0)
    with pytest.raises(ValueError, match="greedy"):
        kvlib.generate(model, ids, 4, num_beams=2, temperature=0.7)
    with pytest.raises(ValueError, match="not a list"):
        kvlib.generate(model, [ids[0], ids[0, 1:]], 4, num_beams=2)
