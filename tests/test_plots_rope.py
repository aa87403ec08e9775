"""kvlib.plots.rope: the arrows are the key of the ``RopeRotation`` it is given, pair by pair."""

import math

import pytest
import torch
from matplotlib.text import Annotation

import kvlib
from kvlib.measure import rope_rotation
from kvlib.models.llama import rope_frequencies
from kvlib.plots import PlotFigure, plot_rope_rotation


def arrow_tips(ax) -> list[tuple[float, float]]:
    return [a.xy for a in ax.texts if isinstance(a, Annotation)]


@pytest.mark.parametrize("preset,pairs", [("llama-3-8b", (0, 8, 16, 63)),
                                          ("tiny-llama", (0, 3, 7)),
                                          ("llama-3.2-1b", (0, 20, 31))])  # with Llama 3 scaling
def test_arrows_turn_by_each_pairs_frequency(preset, pairs):
    positions = [0, 1, 2, 3, 5, 8]
    fig = plot_rope_rotation(rope_rotation(positions=positions, model=preset), pairs=pairs)
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


def test_given_key_and_bad_pairs():
    key = torch.zeros(16)
    key[0] = 1.0  # pair 0 = (1, 0): its tips are (cos, sin) of p x 1 rad
    rot = rope_rotation(key, range(3), "tiny-llama")
    fig = plot_rope_rotation(rot, pairs=(0,))
    tips = [c for tip in arrow_tips(fig.axes[0]) for c in tip]
    assert tips == pytest.approx([c for p in range(3) for c in (math.cos(p), math.sin(p))])
    assert "head_dim 16" in fig.texts[0].get_text()
    with pytest.raises(ValueError, match=r"pairs must be between 0 and 7"):
        plot_rope_rotation(rot, pairs=(8,))
