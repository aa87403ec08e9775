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


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
@torch.inference_mode()
def test_functional_llama_step_is_the_decode_step(make_llama, preset):
    from kvlib.bench.gap import LLAMA_GAP_PARTS, functional_llama_step, fused_weights

    model = make_llama(preset, seed=2)
    V = model.cfg.vocab_size
    prompt = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    tok = torch.tensor([[7], [V - 3]])
    model.set_kv_cache("prealloc", max_len=10)
    model(prompt, use_cache=True)
    want = kvlib.decode_one(model, tok)  # writes slot 9 and moves the counters to 10
    got = functional_llama_step(model, tok, kv_len=9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fused = functional_llama_step(model, tok, 9, fused=fused_weights(model))
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)  # one matrix: same product
    assert model.pos == 10
    for part in LLAMA_GAP_PARTS:  # each kind of op left out changes the answer, shapes stay
        other = functional_llama_step(model, tok, 9, frozenset({part}))
        assert other.shape == want.shape and not torch.allclose(other, want), part


def test_the_gap_command_reports_a_llama(tmp_path):
    import json

    from kvlib.bench import main
    from kvlib.bench.report import gap_text

    out = tmp_path / "gap.json"
    main(["gap", "--model", "tiny-llama", "--kv-len", "12", "--rounds", "4", "--threads", "0",
          "--out", str(out)])
    g = json.loads(out.read_text())
    assert g["same_logits"] and g["ops_per_step"] == {"rmsnorm": 5, "rope": 4, "attention": 2,
                                                      "swiglu": 2, "residual": 4}
    assert list(g["ms"]) == ["kvlib step (modules)", "bare functional step", "without rmsnorm",
                             "without rope", "without attention", "without swiglu",
                             "without residual", "matrix products only",
                             "bare, q/k/v and gate/up fused", "floor"]
    assert all(v > 0 for v in g["ms"].values())
    text = "\n".join(gap_text(g, g["model"]))
    assert "## Where the time above the floor goes: tiny-llama" in text
    assert "| without rope |" in text and "| 4 |" in text


def test_a_model_with_learned_sinks_is_refused(make_llama):
    from kvlib.bench.gap import functional_llama_step

    model = make_llama("tiny-llama", attn_sinks=True)
    with pytest.raises(ValueError, match="learned sinks"):
        functional_llama_step(model, torch.tensor([[1]]), 0)
