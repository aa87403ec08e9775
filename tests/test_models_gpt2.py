"""The GPT-2 model: its config and presets, shapes, the tied head, ids and positions."""

import pytest
import torch

import kvlib

P = torch.tensor([[1, 2, 3]])


def test_config_presets():
    sizes = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 16, 24), "gpt2-large": (1280, 20, 36),
             "gpt2-xl": (1600, 25, 48)}
    for name, (d, h, n) in sizes.items():
        cfg = kvlib.GPTConfig.from_preset(name)
        assert (cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (d, h, n)
        assert cfg.vocab_size == 50257 and cfg.context_length == 1024 and cfg.qkv_bias
    assert kvlib.GPTConfig.from_preset("tiny", n_layers=3).n_layers == 3


def test_gpt2_parameter_count_and_tied_head(gpt2):
    n = sum(p.numel() for p in gpt2.parameters())  # tied head counted once
    assert n == 124_439_808  # the published GPT-2 small count
    assert gpt2.lm_head.weight is gpt2.wte.weight
    assert "lm_head.weight" in gpt2.state_dict()
    assert gpt2.h[0].ln_1.eps == 1e-5


def test_last_only_logits(tiny):
    idx = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        full = tiny(idx)
        last = tiny(idx, last_only=True)
    assert last.shape == (1, 1, tiny.cfg.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_training_mode_dropout_does_not_break_cache(make_model):
    model = make_model(dropout=0.1)
    model.train()
    with torch.no_grad():
        a = model(torch.tensor([[1, 2, 3]]))
    model.eval()
    assert a.shape == (1, 3, 50257)


def test_forward_past_positions_with_cache(tiny):
    tiny.set_kv_cache("concat")
    with torch.no_grad():
        tiny(torch.ones((1, tiny.cfg.context_length), dtype=torch.long), use_cache=True)
        with pytest.raises(ValueError, match="reset_kv_cache"):
            tiny(torch.ones((1, 1), dtype=torch.long), use_cache=True)


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


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'; choose one of"):
        kvlib.GPTConfig.from_preset("gpt5")


def test_make_model_is_deterministic(make_model):
    a, b = make_model(seed=7), make_model(seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
