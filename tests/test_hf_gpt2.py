"""kvlib loads GPT-2 weights in Hugging Face's safetensors layout and matches transformers exactly.

The reference is a small GPT-2 built and saved by ``transformers`` itself (offline, seeded): same
logits, same greedy tokens through every kvlib cache, and a clear error for every broken file.
"""

import json
import subprocess
import sys

import pytest
import torch

import kvlib
from kvlib.hf.gpt2 import (
    PRESETS,
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    from_pretrained,
    hf_config,
    save_pretrained,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
huggingface_hub = pytest.importorskip("huggingface_hub")

VOCAB, CTX = 2048, 128


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small GPT-2 saved by transformers (model.safetensors + config.json) and the model itself.

    initializer_range 0.1 (GPT-2 uses 0.02) makes the random logits spread out, so greedy choices
    are clear wins rather than float-rounding coin tosses (checked in the generation test).
    """
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                  n_positions=CTX, initializer_range=0.1, bos_token_id=None,
                                  eos_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_saved_layout_is_what_we_think(hf_dir):
    path, _ = hf_dir
    keys = safetensors_torch.load_file(path / "model.safetensors").keys()
    assert "transformer.h.1.attn.c_attn.weight" in keys and "lm_head.weight" not in keys


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 33), (2, CTX)])
def test_logits_match_transformers(hf_dir, shape):
    path, hf = hf_dir
    model = kvlib.load_model(path, pretrained=True)
    assert model.cfg == kvlib.GPTConfig(vocab_size=VOCAB, context_length=CTX, emb_dim=64,
                                        n_heads=4, n_layers=2)
    assert not model.training and model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        ours, ref = model(idx), hf(idx).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def hf_greedy(hf_dir):
    """transformers' greedy continuation of a seeded prompt, per batch size (computed once)."""
    _, hf = hf_dir
    refs = {}

    def reference(batch: int, new: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
        if batch not in refs:
            prompt = torch.randint(0, VOCAB, (batch, 9), generator=torch.Generator().manual_seed(4))
            with torch.no_grad():
                out = hf.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                                  pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            top2 = torch.stack([s.topk(2).values for s in out.scores])  # (new, B, 2)
            margin = (top2[..., 0] - top2[..., 1]).min()
            assert margin > 1e-3, f"near-tie ({margin:.1e}) in the reference: pick another seed"
            refs[batch] = prompt, out.sequences
        return refs[batch]

    return reference


@pytest.mark.parametrize("cache,window", [(None, None), ("concat", None), ("prealloc", None),
                                          ("sliding", 40), ("sliding", CTX)])
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_match_transformers_generate(hf_dir, hf_greedy, cache, window, batch):
    path, _ = hf_dir
    model = from_pretrained(path / "model.safetensors")
    prompt, ref = hf_greedy(batch)  # 9 + 30 = 39 tokens: every sliding window holds them all
    ours = kvlib.generate(model, prompt, ref.shape[1] - prompt.shape[1], cache=cache,
                          window=window)
    assert torch.equal(ours.tokens, ref)


def test_round_trip_through_transformers():
    torch.manual_seed(1)
    cfg = kvlib.GPTConfig.from_preset("tiny", vocab_size=VOCAB, context_length=CTX)
    model = kvlib.GPTModel(cfg).eval()
    sd = to_hf_state_dict(model)
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (64, 256)  # Conv1D: (in, out)
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    hf = transformers.GPT2LMHeadModel(hf_config(cfg)).eval()
    result = hf.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in result.missing_keys)
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=0)

    back = from_hf_state_dict(hf.state_dict(), cfg)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert back.lm_head.weight is back.wte.weight


def test_openai_layout_without_prefix_with_buffers_and_no_config(tmp_path, hf_dir):
    """OpenAI's own files: no ``transformer.`` prefix, causal-mask buffers, no config.json."""
    _, hf = hf_dir
    sd = {k: v.clone() for k, v in hf.transformer.state_dict().items()}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, CTX, CTX))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    file = tmp_path / "gpt2-small-test.safetensors"
    safetensors_torch.save_file(sd, file)
    model = from_pretrained(str(file))  # n_heads=4 comes from the matching "tiny" preset
    assert model.cfg.n_heads == 4 and model.cfg.context_length == CTX
    idx = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=0)


def test_load_model_pretrained_with_a_local_path(hf_dir):
    path, hf = hf_dir
    model = kvlib.load_model(str(path), pretrained=True, dtype=torch.float64)
    assert not model.training and next(model.parameters()).dtype == torch.float64
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).float(), hf(idx).logits, atol=1e-5, rtol=0)


# --- errors: each one names the file or tensor and says what to do -----------------------------


def _write(tmp_path, sd, config=None):
    safetensors_torch.save_file(sd, tmp_path / "model.safetensors")
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.fixture
def hf_sd(hf_dir):
    path, _ = hf_dir
    return (safetensors_torch.load_file(path / "model.safetensors"),
            json.loads((path / "config.json").read_text()))


def test_missing_path_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known model name.*gpt2-medium"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors in directory.*notes\.txt"):
        from_pretrained(tmp_path)


def test_pickled_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(ValueError, match="only safetensors"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only safetensors"):
        from_pretrained(tmp_path / "pytorch_model.bin")


def test_corrupt_file_names_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
        from_pretrained(tmp_path)


def test_wrong_shape_names_the_tensor(tmp_path, hf_sd):
    sd, config = hf_sd
    sd["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 255)
    with pytest.raises(ValueError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight' has shape "
                                         r"\(64, 255\), expected \(64, 256\)"):
        from_pretrained(_write(tmp_path, sd, config))


def test_unexpected_tensor_is_named(tmp_path, hf_sd):
    sd, config = hf_sd
    sd["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) 'transformer\.h\.0\.attn\.rot"):
        from_pretrained(_write(tmp_path, sd, config))


def test_missing_tensor_is_named(tmp_path, hf_sd):
    sd, config = hf_sd
    del sd["transformer.h.1.ln_2.bias"]
    with pytest.raises(ValueError, match=r"missing tensor\(s\) 'h\.1\.ln_2\.bias'"):
        from_pretrained(_write(tmp_path, sd, config))


def test_untied_head_is_refused(hf_sd):
    sd, config = hf_sd
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 1
    with pytest.raises(ValueError, match="'lm_head.weight' differs from wte.weight"):
        from_hf_state_dict(sd, config_from_hf(config))


def test_unsupported_config_is_refused(tmp_path, hf_sd):
    sd, config = hf_sd
    with pytest.raises(ValueError, match="unsupported.*activation_function"):
        from_pretrained(_write(tmp_path, sd, {**config, "activation_function": "relu"}))


# --- the hub: offline here, so only the failure paths run ---------------------------------------


def test_hub_name_offline_says_how_to_use_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set") as err:
        kvlib.load_model("gpt2", pretrained=True)
    msg = str(err.value)
    assert "openai-community/gpt2" in msg
    assert "load_model('/path/to/model.safetensors', pretrained=True)" in msg
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        kvlib.load_model("gpt2-medium", pretrained=True)


def test_hub_unreachable_says_how_to_use_a_local_file(monkeypatch):
    def unreachable(*args, **kwargs):  # what hf_hub_download raises when DNS fails, minus retries
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(OSError, match="could not be reached.*cannot reach the hub") as err:
        from_pretrained("openai-community/gpt2-xl")
    assert "HF_HUB_CACHE" in str(err.value)


def test_kvlib_imports_without_the_pretrained_extra():
    code = ("import sys\n"
            "for m in ('safetensors', 'huggingface_hub', 'transformers'): sys.modules[m] = None\n"
            "import kvlib, kvlib.hf.gpt2\n"
            "try:\n"
            "    kvlib.load_model('gpt2', pretrained=True)\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "kvlib[pretrained]"' in out.stdout


@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_json_round_trip(preset):
    cfg = PRESETS[preset]
    d = config_to_hf(cfg)
    assert config_from_hf(json.loads(json.dumps(d))) == cfg
    assert transformers.GPT2Config(**d).to_dict()["n_embd"] == cfg.emb_dim


def test_save_pretrained_loads_in_transformers_and_back(tmp_path, make_model):
    model = make_model("tiny", vocab_size=VOCAB, context_length=CTX)
    save_pretrained(model, tmp_path)  # float32: exact
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)
    back = from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                 model.state_dict().values(), strict=True))
