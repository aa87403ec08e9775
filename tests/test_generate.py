"""Generation pieces: sampling, the stream, eos, the tokenizer, the model's shape."""

import torch
from conftest import make_model

import kvlib


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


def test_sample_greedy_temperature_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert kvlib.sample(logits).tolist() == [[1]]
    g = torch.Generator().manual_seed(0)
    draws = {kvlib.sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}  # only the two best tokens
    g = torch.Generator().manual_seed(0)
    draws = [kvlib.sample(logits, 5.0, generator=g).item() for _ in range(400)]
    assert set(draws) == {0, 1, 2, 3}  # a high temperature reaches every token
    assert kvlib.sample(logits, 1.0, top_k=1000).shape == (1, 1)  # top_k above vocab is clamped


def test_seeded_sampling_is_reproducible_and_same_across_caches(tiny):
    p = torch.tensor([[1, 2, 3]])
    a = kvlib.generate(tiny, p, 40, temperature=0.8, top_k=50, seed=11)
    b = kvlib.generate(tiny, p, 40, temperature=0.8, top_k=50, seed=11)
    c = kvlib.generate(tiny, p, 40, temperature=0.8, top_k=50, seed=12)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    d = kvlib.generate(tiny, p, 40, cache="prealloc", temperature=0.8, top_k=50, seed=11)
    assert torch.equal(a.tokens, d.tokens)


def test_eos_stops_generation(tiny):
    p = torch.tensor([[1, 2, 3]])
    free = kvlib.generate(tiny, p, 30, cache="concat")
    eos = free.tokens[0, 3 + 4].item()  # the fifth new token
    first = (free.tokens[0, 3:] == eos).nonzero()[0].item()
    out = kvlib.generate(tiny, p, 30, cache="concat", eos_id=eos)
    assert out.tokens.shape[1] == 3 + first + 1
    assert out.tokens[0, -1].item() == eos


def test_stream_steps(tiny):
    p = torch.tensor([[1, 2, 3], [4, 5, 6]])
    steps = list(kvlib.generate_stream(tiny, p, 12, cache="prealloc"))
    assert [s.index for s in steps] == list(range(12))
    assert [s.seq_len for s in steps] == list(range(4, 16))
    assert all(s.tokens.shape == (2,) and s.seconds > 0 for s in steps)
    res = kvlib.generate(tiny, p, 12, cache="prealloc")
    assert torch.equal(torch.stack([s.tokens for s in steps], 1), res.tokens[:, 3:])
    assert len(res.step_times) == 11 and res.decode_tokens_per_s > 0 and res.cache == "prealloc"


def test_zero_new_tokens(tiny):
    p = torch.tensor([[1, 2, 3]])
    out = kvlib.generate(tiny, p, 0, cache="concat")
    assert torch.equal(out.tokens, p) and out.step_times == []


def test_tokenizer_round_trip():
    text = "Hello, I am a language model.<|endoftext|>"
    ids = kvlib.encode(text)
    assert ids[:2] == [15496, 11] and ids[-1] == kvlib.EOT_ID
    assert kvlib.decode(ids) == text


def test_training_mode_dropout_does_not_break_cache():
    model = make_model(dropout=0.1)
    model.train()
    with torch.no_grad():
        a = model(torch.tensor([[1, 2, 3]]))
    model.eval()
    assert a.shape == (1, 3, 50257)
