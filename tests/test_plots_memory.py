"""kvlib.plots.memory: the bars are the sizes ``kvlib.memory`` computes."""

import pytest

from kvlib.memory import MODELS
from kvlib.plots import plot_cache_sizes, plot_memory


def test_memory_plots():
    fig = plot_memory("llama-3-8b", context=32768, batch=2)
    widths = [b.get_width() * 2**30 for b in fig.axes[0].patches]
    spec = MODELS["llama-3-8b"]
    assert widths == pytest.approx([spec.weight_bytes(), spec.cache_bytes(32768, 2),
                                    spec.mha_cache_bytes(32768, 2)])
    assert len(plot_memory("gpt2", 1024).axes[0].patches) == 2  # no GQA bar for GPT-2
    fig = plot_cache_sizes(["gpt2", "qwen3-8b"], contexts=(1024, 4096))
    assert len(fig.axes[0].patches) == 4
    with pytest.raises(ValueError, match="unknown model"):
        plot_memory("gpt5")
    with pytest.raises(ValueError, match="unknown dtype"):
        plot_memory("gpt2", dtype="float8")


def test_plot_layouts_draws_one_line_per_layout():
    from kvlib.memory import ARCHITECTURES, with_layout
    from kvlib.plots import plot_layouts

    g = ARCHITECTURES["gemma-3-27b"]
    fig = plot_layouts({"global only": with_layout(g, None), "5:1, window 1024": g})
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["global only", "5:1, window 1024"]
    full, mixed = (line.get_ydata() for line in lines)
    assert (mixed <= full).all() and mixed[-1] < full[-1] / 4  # the window bends the line
