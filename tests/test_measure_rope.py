"""kvlib.measure.rope: the rotation is the one kvlib's RoPE gives a key before it is cached."""

import math

import pytest
import torch

import kvlib
from kvlib.measure import rope_rotation


def test_the_fast_pair_spins_and_the_slow_pair_barely_moves():
    rot = rope_rotation(torch.randn(128, generator=torch.Generator().manual_seed(1)),
                        range(8), "llama-3-8b")
    fast, slow = rot.angles(0), rot.angles(63)
    assert abs(math.remainder(float(fast[1] - fast[0]), 2 * math.pi) - 1.0) < 1e-9  # 1 rad/pos
    assert float((slow - slow[0]).abs().max()) < 1e-4
    assert rot.head_dim == 128 and rot.rope_theta == kvlib.PRESETS["llama-3-8b"].rope_theta


def test_the_rotation_is_the_one_the_model_caches(make_llama):
    model = make_llama("tiny-llama")
    key = torch.randn(model.cfg.head_dim, generator=torch.Generator().manual_seed(2))
    rot = rope_rotation(key, range(5), model.cfg)
    cos, sin = model.rope(0, 5, like=key)  # the model's own table, positions 0..4
    want = key * cos + kvlib.models.llama.rotate_half(key) * sin
    torch.testing.assert_close(rot.rotated.float(), want, atol=1e-6, rtol=0)


def test_without_a_key_a_seeded_random_one():
    a, b = rope_rotation(model="tiny-llama"), rope_rotation(model="tiny-llama")
    assert torch.equal(a.rotated, b.rotated) and a.positions == list(range(8))
    assert not torch.equal(a.rotated, rope_rotation(model="tiny-llama", seed=1).rotated)


def test_bad_arguments():
    with pytest.raises(ValueError, match="not a RoPE model"):
        rope_rotation(model="gpt2")
    with pytest.raises(ValueError, match=r"key must have shape \(16,\)"):
        rope_rotation(torch.zeros(8), range(3), "tiny-llama")
