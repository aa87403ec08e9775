"""kvlib.plots.figure: figures as small PNGs."""

from kvlib.plots import PlotFigure, figure_png, plot_memory

PNG = b"\x89PNG\r\n\x1a\n"


def test_figure_png_is_a_small_png():
    png = figure_png(plot_memory("gpt2"))
    assert png[:8] == PNG and len(png) < 60_000


def test_a_plot_figure_shows_itself_as_a_png():
    fig = plot_memory("gpt2")
    assert isinstance(fig, PlotFigure) and fig._repr_png_().startswith(PNG)
