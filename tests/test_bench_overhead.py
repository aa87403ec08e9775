"""kvlib.bench.overhead: the bare functional step is kvlib's decode step, op for op."""

import pytest
import torch

import kvlib
from kvlib.bench import GAP_PARTS, functional_step

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.inference_mode()
def test_functional_step_is_the_decode_step(make_model):
    model = make_model("gpt2", n_layers=2, emb_dim=48, n_heads=4, vocab_size=300)
    prompt = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    tok = torch.tensor([[7], [250]])
    model.set_kv_cache("prealloc", max_len=10)
    model(prompt, use_cache=True)
    want = kvlib.decode_one(model, tok)  # writes slot 9 and moves the counters to 10
    got = functional_step(model, tok, kv_len=9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.pos == 10 and all(c.get_seq_length() == 10 for c in model.caches)
    for part in GAP_PARTS:  # each kind of op left out changes the answer, shapes stay
        other = functional_step(model, tok, 9, frozenset({part}))
        assert other.shape == want.shape and not torch.allclose(other, want), part
