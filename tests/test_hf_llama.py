"""kvlib loads Llama and Qwen3 checkpoints in Hugging Face's layout and matches transformers.

The references are small models built and saved by ``transformers`` itself (offline, seeded):
grouped-query and multi-head attention, Llama 3's RoPE scaling, tied and untied heads, one sharded
save. Same logits, the same 100 greedy tokens through every kvlib cache, and a clear error for
every broken checkpoint.
"""

import json
import subprocess
import sys

import pytest
import torch

import kvlib
from kvlib.hf import llama as hf_llama
from kvlib.hf.llama import (
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    from_pretrained,
    save_pretrained,
    to_hf_config,
    to_hf_model,
    to_hf_state_dict,
)
from kvlib.models.llama import LLAMA_PRESETS, LlamaModel

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
huggingface_hub = pytest.importorskip("huggingface_hub")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, CTX, NEW = 512, 128, 100
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# name: (model_type, query heads, kv heads, head_dim, tied, llama3 rope, attention, sharded)
CASES = {
    "llama-gqa-rope-scaling": ("llama", 4, 2, 16, False, True, "eager", False),
    "llama-mha-tied": ("llama", 4, 4, 16, True, False, "sdpa", False),
    "qwen3-gqa-tied": ("qwen3", 4, 2, 32, True, False, "eager", False),
    "qwen3-mqa-sharded": ("qwen3", 4, 1, 16, False, False, "sdpa", True),
}


def save_case(name: str, path, dtype: torch.dtype = torch.float32):
    """A transformers model of ``CASES[name]``, saved to ``path``; returns the (float32) model.

    initializer_range 0.1 spreads the random logits, so greedy choices are clear wins rather than
    float-rounding coin tosses (checked in the generation test)."""
    model_type, heads, kv, head_dim, tied, scaled, attn, sharded = CASES[name]
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                  max_position_embeddings=CTX, initializer_range=0.1, tie_word_embeddings=tied,
                  rope_theta=500000.0 if scaled else 10000.0, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, attn_implementation=attn)
    if scaled:
        fields["rope_scaling"] = LLAMA3_ROPE
    cls, config_cls = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                       "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config)}[
        model_type]
    torch.manual_seed(sum(map(ord, name)))
    model = cls(config_cls(**fields)).eval()
    model.to(dtype).save_pretrained(path, safe_serialization=True,
                                    **({"max_shard_size": "150KB"} if sharded else {}))
    return model.float()


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


def test_saved_layout_is_what_we_think(case):
    name, path, hf, model = case
    _, heads, kv, head_dim, tied, scaled, _, sharded = CASES[name]
    index = path / "model.safetensors.index.json"
    assert index.is_file() == sharded
    files = sorted(path.glob("*.safetensors"))
    assert len(files) > 1 if sharded else [f.name for f in files] == ["model.safetensors"]
    keys = set().union(*(safetensors_torch.load_file(f).keys() for f in files))
    assert ("lm_head.weight" in keys) != tied and "model.layers.1.self_attn.k_proj.weight" in keys
    cfg = model.cfg
    assert isinstance(model, kvlib.LlamaModel) and not model.training
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (heads, kv,
                                                                              head_dim, tied)
    assert cfg.qk_norm == name.startswith("qwen3") and (cfg.rope_scaling is not None) == scaled
    assert cfg.context_length == CTX and cfg.vocab_size == VOCAB


@pytest.mark.parametrize("shape", [(1, 1), (2, 37), (1, CTX)])
def test_logits_match_transformers(case, shape):
    _, _, hf, model = case
    idx = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_logits_match_past_the_context(case):
    name, path, hf, _ = case
    model = kvlib.load_model(path)  # a fresh one: the warning comes once per model
    idx = torch.randint(0, VOCAB, (1, CTX + 40), generator=torch.Generator().manual_seed(5))
    with pytest.warns(UserWarning, match=f"position {CTX + 39} is past the {CTX} tokens"):
        with torch.no_grad():
            ours = model(idx)
    with torch.no_grad():
        torch.testing.assert_close(ours, hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache,window", [(None, None), ("concat", None), ("prealloc", None),
                                          ("sliding", CTX)])
def test_greedy_tokens_match_transformers_generate(case, hf_greedy, cache, window):
    _, _, _, model = case
    prompt, ref = hf_greedy  # 9 + 100 = 109 tokens: the sliding window holds them all
    out = kvlib.generate(model, prompt, NEW, cache=cache, window=window)
    assert torch.equal(out.tokens, ref)
    if cache is not None:
        cfg, itemsize = model.cfg, 4
        held = model.caches[0].capacity or model.caches[0].tokens_held  # slots allocated
        assert held == {"concat": 108, "prealloc": 109, "sliding": CTX}[cache]
        assert model.kv_cache_nbytes == (2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * held
                                         * itemsize * prompt.shape[0])


def test_small_sliding_window_matches_windowed_recomputation(case, hf_greedy):
    _, _, _, model = case
    prompt, full = hf_greedy
    ref = kvlib.generate(model, prompt, NEW, window=24)  # no cache, attention masked to 24
    out = kvlib.generate(model, prompt, NEW, cache="sliding", window=24)
    assert torch.equal(out.tokens, ref.tokens)
    assert not torch.equal(out.tokens, full)  # the window changed the text


def test_load_model_variants(case):
    name, path, hf, _ = case
    idx = torch.randint(0, VOCAB, (1, 12))
    model = kvlib.load_model(str(path), pretrained=True, dtype=torch.float64)
    assert next(model.parameters()).dtype == model.rope.cos.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(model(idx).float(), hf(idx).logits, atol=1e-4, rtol=0)
    if not CASES[name][-1]:  # one .safetensors file with config.json beside it
        model = kvlib.load_model(path / "model.safetensors")
        with torch.no_grad():
            torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_bfloat16_checkpoint_loads_with_an_exact_rope_table(tmp_path):
    hf = save_case("llama-gqa-rope-scaling", tmp_path, dtype=torch.bfloat16)
    sd = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    native = from_pretrained(tmp_path)  # the stored dtype
    assert next(native.parameters()).dtype == native.rope.cos.dtype == torch.bfloat16
    model = kvlib.load_model(tmp_path)  # float32 weights (bfloat16 values), float32 RoPE
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    idx = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=1e-4, rtol=0)


# --- kvlib -> transformers ----------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_round_trip_through_transformers(preset):
    cfg = kvlib.LlamaConfig.from_preset(preset, vocab_size=VOCAB, rope_scaling={"factor": 4.0,
                                        "original_context_length": 64})
    torch.manual_seed(1)
    model = kvlib.LlamaModel(cfg).eval()
    hf = to_hf_model(model, attn_implementation="eager")
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM")
    sd = to_hf_state_dict(model)
    assert set(sd) == set(hf.state_dict())
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)
    back = from_hf_state_dict(hf.state_dict(), cfg)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert (back.lm_head.weight is back.embed_tokens.weight) == cfg.tie_embeddings


@pytest.mark.parametrize("preset", list(LLAMA_PRESETS))
def test_config_round_trip(preset):
    cfg = LLAMA_PRESETS[preset]
    hf = to_hf_config(cfg)
    assert hf.model_type == ("qwen3" if cfg.qk_norm else "llama")
    assert config_from_hf(hf.to_dict()) == cfg


@pytest.mark.parametrize("preset", list(LLAMA_PRESETS))
def test_config_json_round_trip_and_save_pretrained(preset, tmp_path):
    cfg = LLAMA_PRESETS[preset]
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg
    if cfg.vocab_size * cfg.emb_dim > 10**7:
        return  # the released shapes: the config is enough
    torch.manual_seed(0)
    model = LlamaModel(cfg).eval()
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    back = kvlib.load_model(tmp_path)  # bfloat16 on disk, float32 by default
    for (key, a), b in zip(back.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b.to(torch.bfloat16).float()), key


# The published config.json files (transformers 4 layout: rope_theta and rope_scaling on top).
PUBLISHED = {
    "llama-3.2-1b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "pretraining_tp": 1},
    "llama-3-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "attention_bias": False, "hidden_act": "silu"},
    "qwen3-0.6b": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "tie_word_embeddings": True, "attention_bias": False, "hidden_act": "silu",
        "sliding_window": None, "use_sliding_window": False, "max_window_layers": 28},
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_published_configs_give_the_presets(preset):
    assert config_from_hf(PUBLISHED[preset]) == LLAMA_PRESETS[preset]


# --- errors: each one names the tensor or field and the file ------------------------------------


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    save_case("qwen3-gqa-tied", path)
    return path


def _broken(tmp_path, src, edit_sd=None, edit_config=None):
    """A copy of the checkpoint ``src`` with its tensors and/or config edited."""
    sd = safetensors_torch.load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    if edit_sd:
        edit_sd(sd)
    if edit_config:
        edit_config(config)
    safetensors_torch.save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_wrong_shape_names_the_tensor_and_file(tmp_path, qwen_dir):
    def edit(sd):
        sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(127, 64)

    path = _broken(tmp_path, qwen_dir, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\."
                                         r"up_proj\.weight' has shape \(127, 64\), expected "
                                         r"\(128, 64\) for a Qwen3"):
        kvlib.load_model(path)


def test_wrong_shape_in_a_shard_names_the_shard(tmp_path):
    save_case("qwen3-mqa-sharded", tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index["model.layers.0.self_attn.k_proj.weight"]
    sd = safetensors_torch.load_file(tmp_path / shard)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    safetensors_torch.save_file(sd, tmp_path / shard)
    with pytest.raises(ValueError, match=rf"{shard}: tensor 'model\.layers\.0\.self_attn\.k_proj"
                                         r"\.weight' has shape \(32, 64\), expected \(16, 64\)"):
        kvlib.load_model(tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("model.layers.0.self_attn.k_norm.weight"),
     r"missing tensor\(s\) 'model\.layers\.0\.self_attn\.k_norm\.weight'"),
    (lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}),
     r"unexpected tensor\(s\) 'model\.layers\.0\.self_attn\.q_proj\.bias'"),
    (lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"] + 1}),
     r"'lm_head\.weight' differs from 'model\.embed_tokens\.weight'.*tie_word_embeddings"),
])
def test_broken_tensors_are_named(tmp_path, qwen_dir, edit, message):
    with pytest.raises(ValueError, match=message):
        kvlib.load_model(_broken(tmp_path, qwen_dir, edit))


def test_untied_checkpoint_without_a_head_and_stored_rope_frequencies(tmp_path, qwen_dir):
    def untie(config):
        config["tie_word_embeddings"] = False

    with pytest.raises(ValueError, match=r"missing tensor\(s\) 'lm_head\.weight'"):
        kvlib.load_model(_broken(tmp_path, qwen_dir, edit_config=untie))

    def add_inv_freq(sd):  # some converted checkpoints store them: ignored
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)

    model = kvlib.load_model(_broken(tmp_path, qwen_dir, add_inv_freq))
    assert isinstance(model, kvlib.LlamaModel)


@pytest.mark.parametrize("edit,message", [
    ({"attention_bias": True}, r"unsupported: \{'attention_bias': True\}"),
    ({"hidden_act": "gelu"}, r"unsupported: \{'hidden_act': 'gelu'\}"),
    ({"use_sliding_window": True}, "unsupported.*use_sliding_window"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
     "RoPE type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, r"config\.json: n_kv_heads \(3\) must divide n_heads \(4\)"),
    ({"num_hidden_layers": None}, r"num_hidden_layers"),
])
def test_unsupported_config_is_refused(tmp_path, qwen_dir, edit, message):
    def change(config):
        config.update(edit)
        if config["num_hidden_layers"] is None:
            del config["num_hidden_layers"]

    with pytest.raises(ValueError, match=message):
        kvlib.load_model(_broken(tmp_path, qwen_dir, edit_config=change))


def test_family_comes_from_config_json(tmp_path, qwen_dir):
    def mistral(config):
        config["model_type"] = "mistral"

    path = _broken(tmp_path, qwen_dir, edit_config=mistral)
    with pytest.raises(ValueError, match="'mistral'; kvlib loads GPT-2, Llama and Qwen3"):
        kvlib.load_model(path)
    with pytest.raises(ValueError, match="model_type 'mistral' is not one kvlib.hf.llama loads"):
        from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json beside the weights"):
        from_pretrained(path)


# --- the hub: offline here, so a stand-in serves the files --------------------------------------


def test_hub_names_dispatch_to_the_llama_loader(tmp_path, monkeypatch):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    refs = {"Qwen/Qwen3-0.6B": (single, save_case("qwen3-gqa-tied", single)),
            "Qwen/Qwen3-8B": (sharded, save_case("qwen3-mqa-sharded", sharded))}
    asked = []

    def fake_download(repo: str, filename: str) -> str:
        asked.append((repo, filename))
        return str(refs[repo][0] / filename)

    monkeypatch.setattr(hf_llama, "download", fake_download)
    idx = torch.randint(0, VOCAB, (1, 10))
    for name, repo in [("qwen3-0.6b", "Qwen/Qwen3-0.6B"), ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B")]:
        model = kvlib.load_model(name, pretrained=True)
        with torch.no_grad():
            torch.testing.assert_close(model(idx), refs[repo][1](idx).logits, atol=1e-4, rtol=0)
    assert asked[:2] == [("Qwen/Qwen3-0.6B", "config.json"),
                         ("Qwen/Qwen3-0.6B", "model.safetensors")]
    assert asked[3] == ("Qwen/Qwen3-8B", "model.safetensors.index.json")
    assert len(asked) > 5  # config, index and every shard


def test_hub_name_offline_says_how_to_use_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    with pytest.raises(OSError, match="could not get config.json of Qwen/Qwen3-0.6B: "
                                      "HF_HUB_OFFLINE is set"):
        kvlib.load_model("qwen3-0.6b", pretrained=True)


def test_presets_without_released_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="released weights.*qwen3-0.6b.*pretrained=False"):
        kvlib.load_model("tiny-llama", pretrained=True)


def test_llama_loader_imports_without_the_pretrained_extra():
    code = ("import sys\n"
            "for m in ('safetensors', 'huggingface_hub', 'transformers'): sys.modules[m] = None\n"
            "import kvlib, kvlib.hf.llama\n"
            "try:\n"
            "    kvlib.load_model('qwen3-0.6b', pretrained=True)\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "kvlib[pretrained]"' in out.stdout
