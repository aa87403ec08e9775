"""kvlib.load_model: the one way to get a model (preset, seed, dtype, device, or a local path)."""

import pytest
import torch

import kvlib


def test_preset_is_seeded_and_in_eval_mode():
    a, b = kvlib.load_model("tiny", seed=5), kvlib.load_model("tiny", seed=5)
    c = kvlib.load_model("tiny", seed=6)
    assert not a.training and isinstance(a, kvlib.GPTModel)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.wte.weight, c.wte.weight)


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
