"""Figures that show themselves in a notebook, and figures as PNG bytes (for widgets)."""

from __future__ import annotations

import io

from matplotlib.figure import Figure


class PlotFigure(Figure):
    """A matplotlib Figure that a notebook shows as a PNG by itself (pyplot not needed)."""

    def _repr_png_(self) -> bytes:
        return figure_png(self, dpi=100, colors=None)


def canvas_png(canvas, colors: int | None) -> bytes:
    """What an Agg canvas shows as PNG bytes; ``colors`` quantizes to a palette of that many
    colours (several times smaller files)."""
    from PIL import Image

    img = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    if colors is not None:
        img = img.quantize(colors=colors, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    img.save(out, format="png", compress_level=9)
    return out.getvalue()


def figure_png(fig: Figure, dpi: int = 72, colors: int | None = 64) -> bytes:
    """A figure as PNG bytes; ``colors`` quantizes to a palette (several times smaller files)."""
    if colors is None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas_png(canvas, colors)
