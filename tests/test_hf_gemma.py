"""kvlib loads Gemma 3 text checkpoints (``Gemma3ForCausalLM``) and matches transformers.

The references are small random models built and saved by transformers itself (offline,
seeded): seven layers, so both layer types appear (layer 5 global), a window of 8 that bites in
a 40-token text, GQA, Gemma's (1 + weight) norms moved off zero. Same logits, the same greedy
tokens as ``generate(do_sample=False)`` through every cache that applies, the bytes of a window
on local layers, and a clear error for what kvlib does not implement.
"""

import dataclasses
import json

import pytest
import torch

import kvlib
from kvlib.hf.gemma import config_from_hf, config_to_hf, save_pretrained, to_hf_model
from kvlib.models.gemma import GLOBAL, LOCAL, GemmaModel

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CTX, W, NEW = 300, 128, 8, 60
# name: (attention, tied head, final soft-cap, global RoPE parameters)
CASES = {
    "linear-rope-softcap": ("eager", True, 30.0,
                            {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}),
    "plain-untied": ("sdpa", False, None, {"rope_type": "default", "rope_theta": 1000000.0}),
}


def save_case(name: str, path):
    """A transformers ``Gemma3ForCausalLM`` of ``CASES[name]``, saved to ``path``."""
    attn, tied, cap, rope = CASES[name]
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=CTX,
        sliding_window=W, query_pre_attn_scalar=24, initializer_range=0.1,
        final_logit_softcapping=cap, tie_word_embeddings=tied,
        rope_parameters={GLOBAL: rope, LOCAL: {"rope_type": "default", "rope_theta": 5000.0}},
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation=attn)
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma's norms start at 0, the identity: move them off it
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, checkpoint folder, transformers model, kvlib model loaded from the folder)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = save_case(request.param, path)
    return request.param, path, hf, kvlib.load_model(path)


@pytest.fixture(scope="module")
def hf_greedy(case):
    """transformers' greedy continuation of a seeded 9-token prompt (69 tokens in all: the
    window of 8 turns over many times), checked for near-ties."""
    hf = case[2]
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = hf.generate(prompt, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack([s.topk(2).values for s in out.scores])  # (new, B, 2)
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3, "near-tie in the reference"
    return prompt, out.sequences


def test_config_is_read_as_written(case):
    name, path, _, model = case
    _, tied, cap, rope = CASES[name]
    cfg = model.cfg
    assert isinstance(model, GemmaModel) and not model.training
    assert cfg.layer_types == (LOCAL,) * 5 + (GLOBAL, LOCAL) and cfg.sliding_window == W
    assert (cfg.tie_embeddings, cfg.final_softcap, cfg.query_pre_attn_scalar) == (tied, cap, 24)
    assert cfg.rope_scaling_factor == rope.get("factor") and cfg.rope_local_theta == 5000.0
    assert config_from_hf(config_to_hf(cfg)) == cfg  # kvlib's own config.json reads back


@pytest.mark.parametrize("shape", [(1, 1), (2, 40), (1, CTX)])
def test_logits_match_transformers(case, shape):
    _, _, hf, model = case
    idx = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_logits_match_transformers_through_its_own_cache(case):
    """transformers' DynamicCache (sliding layers keep their window) against kvlib's prealloc,
    teacher-forced: a prompt, then one token at a time."""
    _, _, hf, model = case
    seq = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    model.set_kv_cache("prealloc", max_len=40)
    cache = transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        ours = [model(seq[:, :12], use_cache=True)]
        theirs = [hf(seq[:, :12], cache=cache, use_cache=True).logits]
        for t in range(12, 40):
            ours.append(model(seq[:, t : t + 1], use_cache=True))
            theirs.append(hf(seq[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(ours, 1), torch.cat(theirs, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache,window", [(None, None), ("concat", None), ("prealloc", None),
                                          ("sliding", CTX), ("paged", None)])
def test_greedy_tokens_match_transformers_generate(case, hf_greedy, cache, window):
    _, _, _, model = case
    prompt, ref = hf_greedy
    out = kvlib.generate(model, prompt, NEW, cache=cache, window=window)
    assert torch.equal(out.tokens, ref)
    if cache in ("prealloc", "sliding"):  # slots allocated: the window, or all tokens
        per_token = 2 * model.cfg.n_kv_heads * model.cfg.head_dim * 4  # keys + values, float32
        full = {"prealloc": 9 + NEW, "sliding": CTX}[cache]
        assert [c.nbytes for c in model.caches] == [
            (full if t == GLOBAL else W) * per_token for t in model.cfg.layer_types]


@pytest.mark.parametrize("cache", ["sinks", "evict", "recompute"])
def test_strategies_that_cannot_apply_refuse(case, cache):
    model = case[3]
    options = dict(budget=32) if cache == "evict" else dict(window=16)
    with pytest.raises(ValueError, match="cannot serve a model with sliding-window layers"):
        kvlib.generate(model, torch.tensor([[1, 2, 3]]), 5, cache=cache, **options)


def test_round_trip_through_kvlib(case, tmp_path):
    _, _, hf, model = case
    save_pretrained(model, tmp_path)  # kvlib writes, kvlib and transformers read
    again = kvlib.load_model(tmp_path)
    back = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(idx).logits
        for got in (again(idx), back(idx).logits, to_hf_model(model)(idx).logits):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("change,match", [
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(hidden_activation="gelu"), "hidden_activation"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(model_type="gemma3"), r"Gemma 3 text .*\(model_type .*'gemma3_text'"),
    (dict(rope_parameters={GLOBAL: {"rope_type": "yarn", "factor": 8.0}, LOCAL: {}}),
     "RoPE .* is not supported"),
])
def test_unsupported_configs_are_refused_by_name(case, tmp_path, change, match):
    path = case[1]
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**_config(path), **change}))
    with pytest.raises(ValueError, match=match):
        kvlib.load_model(tmp_path)


def test_transformers_4_config_layout_is_read():
    d = {"model_type": "gemma3_text", "vocab_size": 300, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 12, "num_attention_heads": 4,
         "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 128,
         "sliding_window": 8, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
         "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
         "query_pre_attn_scalar": 16}
    cfg = config_from_hf(d)
    assert cfg.layer_types.count(GLOBAL) == 2 and cfg.layer_types[5] == GLOBAL
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling_factor) == (1e6, 1e4, 8.0)
    assert cfg.tie_embeddings  # Gemma's default
    with pytest.raises(ValueError, match="multimodal Gemma 3 .* loads the text model only"):
        config_from_hf({**d, "model_type": "gemma3"})


def test_soft_capped_scores_equal_transformers_eager_attention():
    """kvlib's attn_softcap (Gemma 2's, which transformers' Gemma 3 stores but never passes on)
    against the eager attention function transformers' Gemma 3 module defines with a softcap,
    over a local window: the same ``cap * tanh(scores / cap)`` before the mask."""
    from transformers.models.gemma3 import modeling_gemma3

    from kvlib.models.base import attend_with

    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(1, 4, 12, 16, generator=g) * 3, *torch.randn(2, 1, 2, 12, 16,
                                                                       generator=g)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    visible = (j <= i) & (j > i - 5)  # a window of 5
    mask = torch.zeros(12, 12).masked_fill(~visible, float("-inf"))[None, None]
    theirs, _ = modeling_gemma3.eager_attention_forward(module, q, k, v, mask, scaling=24**-0.5,
                                                        softcap=2.0)
    ours = attend_with(q, k, v, None, window=5, scale=24**-0.5, softcap=2.0)
    torch.testing.assert_close(ours.transpose(1, 2), theirs, atol=1e-6, rtol=0)
    assert (attend_with(q, k, v, None, window=5, scale=24**-0.5) - ours).abs().max() > 1e-3


def test_a_model_with_attn_softcap_runs_and_has_no_transformers_twin(case):
    cfg = dataclasses.replace(case[3].cfg, attn_softcap=5.0)
    torch.manual_seed(0)
    model = GemmaModel(cfg).eval()
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(kvlib.generate(model, prompt, 20, cache="prealloc").tokens,
                       kvlib.generate(model, prompt, 20).tokens)
    with pytest.raises(ValueError, match="ignores attn_logit_softcapping"):
        config_to_hf(cfg)
