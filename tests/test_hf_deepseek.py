"""kvlib loads DeepSeek-V3 checkpoints (dense layers) in Hugging Face's layout and matches
transformers' ``DeepseekV3ForCausalLM``.

The references are small models built and saved by ``transformers`` itself (offline, seeded): low-
rank queries or one ``q_proj``, interleaved RoPE or not, tied and untied heads, SDPA and eager.
Same logits, transformers' greedy tokens through every cache that applies, in both of kvlib's
ways of attending, and a clear error for what kvlib does not implement (mixture of experts, YaRN).
"""

import json

import pytest
import torch

import kvlib
from kvlib.hf.deepseek import (
    config_from_hf,
    config_to_hf,
    from_pretrained,
    to_hf_model,
)
from kvlib.models.deepseek import DEEPSEEK_PRESETS, DeepseekModel

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CTX, NEW, LAYERS = 300, 128, 60, 3
ABSORB_ATOL = 1e-4  # absorbed attention against transformers' (naive) numbers, float32
# name: (q_lora_rank, rope_interleave, tied, attention)
CASES = {
    "q-lora-interleaved": (32, True, False, "sdpa"),
    "q-proj-tied-eager": (None, False, True, "eager"),
}
# The strategies that store the latent exactly, with options that hold the 9 + 60 tokens.
CACHES = [(None, {}), ("concat", {}), ("prealloc", {}), ("sliding", {"window": CTX}),
          ("paged", {"block_size": 8}), ("quantized", {"residual": CTX}),
          ("evict", {"budget": CTX}), ("recompute", {"window": CTX})]


def hf_config(q_lora_rank, interleave, tied, attn, **overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=LAYERS, first_k_dense_replace=LAYERS, num_attention_heads=4,
                  num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  max_position_embeddings=CTX, rope_interleave=interleave,
                  initializer_range=0.1, tie_word_embeddings=tied, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, attn_implementation=attn)
    return transformers.DeepseekV3Config(**{**fields, **overrides})


def save_case(name: str, path):
    """A transformers model of ``CASES[name]`` saved to ``path``; returns it (float32, eval).
    initializer_range 0.1 spreads the random logits, so greedy choices are clear wins."""
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.DeepseekV3ForCausalLM(hf_config(*CASES[name])).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, checkpoint folder, transformers model, kvlib model loaded from the folder)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = save_case(request.param, path)
    return request.param, path, hf, kvlib.load_model(path)


@pytest.fixture(scope="module")
def hf_greedy(case):
    """transformers' greedy continuation (batch 2) of a seeded prompt, and the prompt."""
    _, _, hf, _ = case
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf.generate(prompt, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack([s.topk(2).values for s in out.scores])  # (new, B, 2)
    margin = (top2[..., 0] - top2[..., 1]).min()
    assert margin > 1e-3, f"near-tie ({margin:.1e}) in the reference: pick another seed"
    return prompt, out.sequences


@pytest.fixture
def absorbed(case):
    """The case's kvlib model attending over the latent, put back to "naive" afterwards."""
    model = case[3]
    model.attn_impl = "absorb"
    yield model
    model.attn_impl = "naive"


def test_loaded_config_and_names(case):
    name, path, hf, model = case
    q_lora_rank, interleave, tied, _ = CASES[name]
    cfg = model.cfg
    assert isinstance(model, DeepseekModel) and not model.training
    assert (cfg.q_lora_rank, cfg.rope_interleave, cfg.tie_embeddings) == (q_lora_rank,
                                                                         interleave, tied)
    assert (cfg.n_layers, cfg.context_length, cfg.vocab_size) == (LAYERS, CTX, VOCAB)
    keys = set(safetensors_torch.load_file(path / "model.safetensors"))
    ours = {k if k.startswith("lm_head.") else f"model.{k}" for k in model.state_dict()}
    assert keys == ours - ({"lm_head.weight"} if tied else set())  # 1:1, nothing renamed


@pytest.mark.parametrize("shape", [(1, 1), (2, 37), (1, CTX)])
def test_logits_match_transformers(case, shape):
    _, _, hf, model = case
    idx = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        want = hf(idx).logits
        torch.testing.assert_close(model(idx), want, atol=1e-4, rtol=0)
        model.attn_impl = "absorb"
        try:
            torch.testing.assert_close(model(idx), want, atol=ABSORB_ATOL, rtol=0)
        finally:
            model.attn_impl = "naive"


@pytest.mark.parametrize("cache,options", CACHES)
def test_greedy_tokens_match_transformers_generate(case, hf_greedy, cache, options):
    _, _, _, model = case
    prompt, ref = hf_greedy
    out = kvlib.generate(model, prompt, NEW, cache=cache, **options)
    assert torch.equal(out.tokens, ref)
    if cache in ("concat", "prealloc", "sliding"):
        cfg = model.cfg
        held = model.caches[0].capacity or model.caches[0].tokens_held  # slots allocated
        assert held == {"concat": 9 + NEW - 1, "prealloc": 9 + NEW, "sliding": CTX}[cache]
        assert model.kv_cache_nbytes == (cfg.n_layers * held * prompt.shape[0] * 4
                                         * (cfg.kv_lora_rank + cfg.qk_rope_head_dim))


@pytest.mark.parametrize("cache,options", CACHES[:5])
def test_absorbed_decoding_gives_transformers_tokens(hf_greedy, absorbed, cache, options):
    prompt, ref = hf_greedy
    assert torch.equal(kvlib.generate(absorbed, prompt, NEW, cache=cache, **options).tokens, ref)


def test_sinks_are_refused(case):
    with pytest.raises(ValueError, match="'sinks' cache moves cached keys.*caches a latent"):
        kvlib.generate(case[3], torch.tensor([[1, 2, 3]]), 4, cache="sinks", window=32)


# --- round trips ---------------------------------------------------------------------------------


def test_kvlib_checkpoint_loads_in_transformers_and_back(case, tmp_path):
    _, _, _, model = case
    kvlib.loading.save_model(model, tmp_path, dtype=None)  # float32: exact
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)
    back = from_pretrained(tmp_path)
    assert back.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


def test_preset_round_trips_through_config_json():
    cfg = DEEPSEEK_PRESETS["tiny-deepseek"]
    d = json.loads(json.dumps(config_to_hf(cfg)))
    assert config_from_hf(d) == cfg
    with torch.device("meta"):
        hf = to_hf_model(DeepseekModel(cfg))
    assert hf.config.first_k_dense_replace == cfg.n_layers
    assert not any("experts" in n for n, _ in hf.named_parameters())  # every layer dense


# --- what kvlib refuses, and what it skips -------------------------------------------------------


def _edited(tmp_path, case, edit_config=None, edit_tensors=None):
    """A copy of the case's checkpoint with its config.json or tensors edited."""
    _, path, _, _ = case
    config = json.loads((path / "config.json").read_text())
    tensors = safetensors_torch.load_file(path / "model.safetensors")
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(first_k_dense_replace=1, n_routed_experts=8),
     r"layers 1\.\.2 are mixture-of-experts layers .*n_routed_experts = 8.*"
     r"set first_k_dense_replace = num_hidden_layers \(3\)"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                         "factor": 40.0, "mscale_all_dim": 1.0}),
     "RoPE type 'yarn' is not supported.*mscale_all_dim"),
    (lambda c: c.update(attention_bias=True), "unsupported: {'attention_bias': True}"),
    (lambda c: c.update(hidden_act="gelu"), "unsupported: {'hidden_act': 'gelu'}"),
    (lambda c: c.pop("kv_lora_rank"), r"missing field\(s\) \['kv_lora_rank'\]"),
])
def test_unsupported_config_is_refused(tmp_path, case, edit, message):
    with pytest.raises(ValueError, match=message):
        kvlib.load_model(_edited(tmp_path, case, edit_config=edit))


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("model.layers.1.self_attn.kv_b_proj.weight"),
     r"missing tensor\(s\) 'model\.layers\.1\.self_attn\.kv_b_proj\.weight'"),
    (lambda sd: sd.update({"model.layers.0.self_attn.kv_b_proj.weight": torch.zeros(4, 32)}),
     r"'model\.layers\.0\.self_attn\.kv_b_proj\.weight' has shape \(4, 32\), expected \(128, 32\)"),
    (lambda sd: sd.update({"model.layers.0.mlp.experts.down_proj": torch.zeros(2)}),
     r"unexpected tensor\(s\) 'model\.layers\.0\.mlp\.experts\.down_proj'"),
])
def test_broken_tensors_are_named(tmp_path, case, edit, message):
    with pytest.raises(ValueError, match=message):
        kvlib.load_model(_edited(tmp_path, case, edit_tensors=edit))


def test_skipped_tensors_and_ignored_kv_heads(tmp_path, case):
    """A multi-token-prediction layer past num_hidden_layers and stored RoPE frequencies are
    skipped, as transformers skips them; num_key_value_heads (128 by transformers' default,
    whatever the head count) means nothing to latent attention."""
    def extra(sd):
        sd[f"model.layers.{LAYERS}.eh_proj.weight"] = torch.zeros(64, 128)
        sd["model.rotary_emb.inv_freq"] = torch.ones(4)

    path = _edited(tmp_path, case, edit_config=lambda c: c.update(num_key_value_heads=128),
                   edit_tensors=extra)
    model, want = kvlib.load_model(path), case[3]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 want.state_dict().values(), strict=True))
