"""kvlib.plots.cache_state: the picture shows the frames it is given."""

import pytest
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure

import kvlib
from kvlib.measure import cache_frames_for
from kvlib.plots import cache_state_pngs, plot_cache_state, token_text

PNG = b"\x89PNG\r\n\x1a\n"


def drawn_slots(fig: Figure) -> tuple[list[int], int]:
    """Positions written in the slot row of the picture (left to right) and the number of boxes
    drawn with the 'written now' edge."""
    ax = fig.axes[0]
    texts = sorted((t.get_position()[0], t.get_text()) for t in ax.texts
                   if abs(t.get_position()[1] - 0.5) < 1e-6)
    red = 0
    for coll in ax.collections:
        if isinstance(coll, PatchCollection):
            red += sum(1 for c, w in zip(coll.get_edgecolors(), coll.get_linewidths(),
                                             strict=True)
                       if w > 2 and c[0] > 0.8 and c[1] < 0.2)
    return [int(t.split(":")[0]) for _, t in texts], red


@pytest.mark.parametrize("spec", ["concat", "prealloc", ("sliding", 4)])
def test_picture_shows_the_frames(tiny, prompt, spec):
    runs = cache_frames_for(tiny, prompt, 7, [spec, "concat"])
    label = next(iter(runs))
    for f in runs[label]:
        fig = plot_cache_state(runs, label, f.step)
        positions, red = drawn_slots(fig)
        assert positions == [p for p in f.positions if p >= 0]  # slot order, as in the buffer
        assert red == len(f.written)
        ax = fig.axes[0]
        titles = [t.get_text() for t in ax.texts if t.get_transform() == ax.transAxes]
        assert len(titles) == 1 and f"step {f.step} " in titles[0]
    with pytest.raises(ValueError, match="step must lie"):
        plot_cache_state(runs, label, 99)


def test_one_png_per_step(tiny, prompt):
    runs = cache_frames_for(tiny, prompt, 4, [("sliding", 2)])
    pngs = cache_state_pngs(runs, "sliding (window 2)")
    assert len(pngs) == 4 and all(p.startswith(PNG) for p in pngs)
    assert len(set(pngs)) == 4  # every step looks different


def test_token_text_is_short_and_drawable():
    assert token_text(kvlib.encode(" cache")[0]) == "␣cache"
    assert token_text(kvlib.encode("\n")[0]) == "⏎"
    assert token_text(kvlib.encode(" cache")[0], width=4) == "␣ca…"
