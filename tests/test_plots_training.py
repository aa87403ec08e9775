"""kvlib.plots.plot_training: loss curves drawn from metrics files."""

import numpy as np
import pytest

from kvlib.plots import PlotFigure, figure_png, plot_training
from kvlib.plots.training import smooth


def metrics(name: str) -> dict:
    steps = list(range(50))
    return {"model": name, "history": {"step": steps, "loss": [9.0 - 0.1 * s for s in steps],
                                       "valid_step": [0, 25, 50], "valid_loss": [9.0, 6.5, 4.1]}}


def test_smooth_is_a_running_mean():
    np.testing.assert_allclose(smooth([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    assert smooth([], 5).shape == (0,)


@pytest.mark.parametrize("runs", [metrics("mini-gpt2"), [metrics("mini-gpt2"), metrics("x")]])
def test_plot_training(runs):
    fig = plot_training(runs, smooth_steps=5)
    assert isinstance(fig, PlotFigure)
    ax = fig.axes[0]
    n = 1 if isinstance(runs, dict) else len(runs)
    assert len(ax.lines) == 2 * n
    assert ax.lines[1].get_ydata().tolist() == [9.0, 6.5, 4.1]  # validation, as recorded
    assert figure_png(fig)[:4] == b"\x89PNG"
