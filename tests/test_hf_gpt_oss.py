"""kvlib's gpt-oss against transformers' ``GptOssForCausalLM``: learned sinks, alternating local
and global layers, the mixture of experts and YaRN, in a small random model saved by
transformers (offline, seeded). Same logits, the same greedy tokens through every cache that
applies, a window's bytes on local layers, clear errors for what kvlib does not load."""

import json

import pytest
import torch

import kvlib
from kvlib.hf.gpt_oss import config_from_hf, config_to_hf, save_pretrained
from kvlib.models import build_model
from kvlib.models.gpt_oss import GLOBAL, LOCAL, GptOssModel

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CTX, W, NEW = 300, 128, 8, 50
YARN = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 32, "rope_theta": 150000.0}


def hf_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=CTX, sliding_window=W, num_local_experts=4,
                  num_experts_per_tok=2, initializer_range=0.1, rope_parameters=YARN,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.GptOssConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(checkpoint folder, transformers model, kvlib model loaded from it)."""
    path = tmp_path_factory.mktemp("gpt-oss")
    torch.manual_seed(0)
    hf = transformers.GptOssForCausalLM(hf_config()).eval()
    with torch.no_grad():  # norms off 1 and biases off 0, as after training
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    hf.save_pretrained(path)
    return path, hf, kvlib.load_model(path)


def test_config_and_presets(case):
    _, hf, model = case
    cfg = model.cfg
    assert isinstance(model, GptOssModel)
    assert cfg.layer_types == (LOCAL, GLOBAL, LOCAL, GLOBAL) and cfg.sliding_window == W
    assert [s.window for s in model.layer_specs()] == [W, None, W, None]
    assert config_from_hf(config_to_hf(cfg)) == cfg
    torch.testing.assert_close(model.rope.inv_freq, hf.model.rotary_emb.inv_freq, atol=0, rtol=0)
    published = {"gpt-oss-20b": 20_914_757_184, "gpt-oss-120b": 116_829_156_672}  # model card
    for name, n in published.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in build_model(kvlib.PRESETS[name]).parameters()) == n


@pytest.mark.parametrize("shape", [(1, 1), (2, 40), (1, CTX)])
def test_logits_match_transformers(case, shape):
    _, hf, model = case
    idx = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def hf_greedy(case):
    hf = case[1]
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf.generate(prompt, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack([s.topk(2).values for s in out.scores])  # (new, B, 2)
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3, "near-tie in the reference"
    return prompt, out.sequences


@pytest.mark.parametrize("cache,window", [(None, None), ("concat", None), ("prealloc", None),
                                          ("sliding", CTX), ("paged", None)])
def test_greedy_tokens_match_transformers_generate(case, hf_greedy, cache, window):
    model = case[2]
    prompt, ref = hf_greedy  # 59 tokens: the window of 8 turns over many times
    out = kvlib.generate(model, prompt, NEW, cache=cache, window=window)
    assert torch.equal(out.tokens, ref)
    if cache == "prealloc":
        per_token = 2 * model.cfg.n_kv_heads * model.cfg.head_dim * 4  # keys + values, float32
        assert [c.nbytes for c in model.caches] == [W * per_token, (9 + NEW) * per_token] * 2


@pytest.mark.parametrize("cache", ["sinks", "evict", "recompute"])
def test_strategies_that_cannot_apply_refuse(case, cache):
    options = dict(budget=32) if cache == "evict" else dict(window=16)
    with pytest.raises(ValueError, match="cannot serve a model with sliding-window layers"):
        kvlib.generate(case[2], torch.tensor([[1, 2, 3]]), 5, cache=cache, **options)


def test_round_trip_through_kvlib(case, tmp_path):
    _, hf, model = case
    save_pretrained(model, tmp_path)
    back = transformers.GptOssForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(idx).logits
        for got in (kvlib.load_model(tmp_path)(idx), back(idx).logits):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change,match", [
    (dict(quantization_config={"quant_method": "mxfp4"}), r"quantized \(mxfp4\); dequantize"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "RoPE .* is not supported"),
    (dict(layer_types=["sliding_attention"] * 3), "each of the 4 layers"),
])
def test_unsupported_configs_are_refused_by_name(case, tmp_path, change, match):
    path = case[0]
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match):
        kvlib.load_model(tmp_path)


def test_packed_experts_are_refused(case):
    from kvlib.hf.gpt_oss import from_hf_state_dict

    sd = {"model.layers.0.mlp.experts.gate_up_proj_blocks": torch.zeros(1, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="MXFP4-packed tensor; dequantize the experts first"):
        from_hf_state_dict(sd, case[2].cfg)


def test_tiny_preset_generates_through_its_rings():
    model = kvlib.load_model("tiny-gpt-oss")
    prompt = torch.randint(0, 50257, (1, 5), generator=torch.Generator().manual_seed(7))
    ref = kvlib.generate(model, prompt, 40)
    out = kvlib.generate(model, prompt, 40, cache="prealloc")
    assert torch.equal(out.tokens, ref.tokens)
    assert [c.capacity for c in model.caches] == [16, 45, 16, 45]
