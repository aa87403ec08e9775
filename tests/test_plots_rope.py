"""kvlib.plots.rope: the arrows are the key as kvlib's RoPE rotates it, pair by pair."""

import math

import pytest
import torch
from matplotlib.text import Annotation

import kvlib
from kvlib.models.llama import rope_frequencies
from kvlib.plots import PlotFigure, plot_rope_rotation, rope_rotation


def arrow_tips(ax) -> list[tuple[float, float]]:
    return [a.xy for a in ax.texts if isinstance(a, Annotation)]


@pytest.mark.parametrize("preset,pairs", [("llama-3-8b", (0, 8, 16, 63)),
                                          ("tiny-llama", (0, 3, 7)),
                                          ("llama-3.2-1b", (0, 20, 31))])  # with Llama 3 scaling
def test_arrows_turn_by_each_pairs_frequency(preset, pairs):
    positions = [0, 1, 2, 3, 5, 8]
    fig = plot_rope_rotation(preset, pairs=pairs, positions=positions)
    assert isinstance(fig, PlotFigure) and len(fig.axes) == len(pairs)
    cfg = kvlib.PRESETS[preset]
    freqs = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).double()
    for ax, i in zip(fig.axes, pairs, strict=True):
        tips = arrow_tips(ax)
        assert len(tips) == len(positions)
        radii = [math.hypot(x, y) for x, y in tips]
        assert radii == pytest.approx([radii[0]] * len(radii))  # a rotation keeps the length
        start = math.atan2(tips[0][1], tips[0][0])
        for p, (x, y) in zip(positions, tips, strict=True):
            turned = math.atan2(y, x) - start  # counter-clockwise by p x frequency, mod 2 pi
            want = p * float(freqs[i])
            assert math.remainder(turned - want, 2 * math.pi) == pytest.approx(0, abs=1e-9)


def test_the_fast_pair_spins_and_the_slow_pair_barely_moves():
    rot = rope_rotation(torch.randn(128, generator=torch.Generator().manual_seed(1)),
                        range(8), "llama-3-8b")
    fast, slow = rot.angles(0), rot.angles(63)
    assert abs(math.remainder(float(fast[1] - fast[0]), 2 * math.pi) - 1.0) < 1e-9  # 1 rad/pos
    assert float((slow - slow[0]).abs().max()) < 1e-4


def test_the_rotation_is_the_one_the_model_caches(make_llama):
    model = make_llama("tiny-llama")
    key = torch.randn(model.cfg.head_dim, generator=torch.Generator().manual_seed(2))
    rot = rope_rotation(key, range(5), model.cfg)
    cos, sin = model.rope(0, 5, like=key)  # the model's own table, positions 0..4
    want = key * cos + kvlib.models.llama.rotate_half(key) * sin
    torch.testing.assert_close(rot.rotated.float(), want, atol=1e-6, rtol=0)


def test_given_key_and_bad_arguments():
    key = torch.zeros(16)
    key[0] = 1.0  # pair 0 = (1, 0): its tips are (cos, sin) of p x 1 rad
    fig = plot_rope_rotation("tiny-llama", pairs=(0,), positions=range(3), key=key)
    tips = [c for tip in arrow_tips(fig.axes[0]) for c in tip]
    assert tips == pytest.approx([c for p in range(3) for c in (math.cos(p), math.sin(p))])
    with pytest.raises(ValueError, match="not a RoPE model"):
        plot_rope_rotation("gpt2")
    with pytest.raises(ValueError, match=r"pairs must be between 0 and 7"):
        plot_rope_rotation("tiny-llama", pairs=(8,))
    with pytest.raises(ValueError, match=r"key must have shape \(16,\)"):
        rope_rotation(torch.zeros(8), range(3), "tiny-llama")
