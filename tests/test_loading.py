"""kvlib.load_model: the one way to get a model (preset or config, seed, dtype, device, a local
path, or a model trained here)."""

import numpy as np
import pytest
import torch

import kvlib
from kvlib import loading
from kvlib.tokenizer import GPT2_VOCAB_SIZE, tokenizer_for
from kvlib.vocab import TrimmedTokenizer


def test_preset_is_seeded_and_in_eval_mode():
    a, b = kvlib.load_model("tiny", seed=5), kvlib.load_model("tiny", seed=5)
    c = kvlib.load_model("tiny", seed=6)
    assert not a.training and isinstance(a, kvlib.GPTModel)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_a_config_gives_seeded_random_weights_of_its_shape():
    cfg = kvlib.GPTConfig(vocab_size=512, context_length=64, emb_dim=32, n_heads=2, n_layers=2)
    a, b = kvlib.load_model(cfg, seed=0), kvlib.load_model(cfg, seed=0)
    assert a.cfg == cfg and not a.training and isinstance(a, kvlib.GPTModel)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    torch.manual_seed(0)  # the same weights as the family's own constructor after that seed
    assert torch.equal(a.wte.weight, kvlib.GPTModel(cfg).wte.weight)
    llama = kvlib.load_model(kvlib.PRESETS["tiny-llama"], dtype=torch.bfloat16)
    assert isinstance(llama, kvlib.LlamaModel) and next(llama.parameters()).dtype == torch.bfloat16


def test_dtype_and_device():
    model = kvlib.load_model("tiny", dtype=torch.bfloat16, device="cpu")
    p = next(model.parameters())
    assert p.dtype == torch.bfloat16 and p.device.type == "cpu"


def test_every_preset_is_listed():
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny"} <= set(kvlib.PRESETS)


def test_unknown_name_says_what_to_pass():
    with pytest.raises(ValueError, match=r"unknown model 'gpt5'.*preset.*local checkpoint"):
        kvlib.load_model("gpt5")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or directory"):
        kvlib.load_model(str(tmp_path / "nowhere" / "model"))


# --- the models trained here: kvlib/trained/<name>/, read through the same loader ---------------


@pytest.fixture(scope="module")
def vocab() -> TrimmedTokenizer:
    counts = np.zeros(GPT2_VOCAB_SIZE, dtype=np.int64)
    counts[kvlib.encode(" def return self import for while")] = 1
    return TrimmedTokenizer.from_counts(counts, vocab_size=kvlib.PRESETS["mini-gpt2"].vocab_size)


@pytest.fixture
def trained_dir(tmp_path, monkeypatch):
    """An empty kvlib/trained/ in a temporary folder: the real files are never touched."""
    monkeypatch.setattr(loading, "TRAINED_DIR", tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", loading.TRAINED)
def test_missing_trained_weights_say_how_to_make_them(trained_dir, name):
    with pytest.raises(FileNotFoundError, match=rf"python -m kvlib\.train --model {name}"):
        kvlib.load_model(name)
    model = kvlib.load_model(name, pretrained=False)  # random weights of the shape still load
    assert model.cfg == kvlib.PRESETS[name] and not hasattr(model, "tokenizer")


@pytest.mark.parametrize("name", loading.TRAINED)
def test_trained_model_round_trip(trained_dir, vocab, name):
    torch.manual_seed(0)
    model = kvlib.models.build_model(kvlib.PRESETS[name])
    model.tokenizer = vocab
    loading.save_model(model, trained_dir / name)  # bfloat16, as shipped
    assert sorted(p.name for p in (trained_dir / name).iterdir()) == [
        "config.json", "model.safetensors", "vocab.json"]
    got = kvlib.load_model(name)
    assert not got.training and got.cfg == model.cfg and type(got) is type(model)
    assert tokenizer_for(got) == vocab
    for (key, a), b in zip(got.state_dict().items(), model.state_dict().values(), strict=True):
        assert a.dtype == torch.float32, key  # stored as bfloat16, cast to float32 by default
        assert torch.equal(a, b.to(torch.bfloat16).float()), key
    assert next(kvlib.load_model(name, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    local = kvlib.load_model(trained_dir / name)  # the folder as a path: the same model
    assert tokenizer_for(local) == vocab and torch.equal(local.lm_head.weight, got.lm_head.weight)
    ids = torch.tensor([vocab.encode("def f(self):")])
    assert torch.equal(kvlib.generate(got, ids, 5, cache="concat").tokens,
                       kvlib.generate(got, ids, 5).tokens)
    random = kvlib.load_model(name, pretrained=False, seed=1)  # random weights, same tokenizer
    assert random.tokenizer == vocab and not torch.equal(random.lm_head.weight, got.lm_head.weight)


def test_a_hugging_face_vocab_json_is_not_taken_for_a_trimmed_one(tmp_path, make_model):
    model = make_model("tiny")
    loading.save_model(model, tmp_path)
    (tmp_path / "vocab.json").write_text('{"!": 0, "\\"": 1}')
    assert tokenizer_for(kvlib.load_model(tmp_path)) is kvlib.tokenizer.GPT2
