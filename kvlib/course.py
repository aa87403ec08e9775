"""Small helpers the chapters share: where the course lives, showing kvlib's real source, and
handing a computed value to the book's prose."""

from __future__ import annotations

import inspect

REPO_URL = "https://github.com/kv-cache-from-scratch/kv-cache-from-scratch"


def show_source(obj) -> object:
    """The real source of a kvlib function or class, syntax-highlighted in a notebook."""
    src = inspect.getsource(obj)
    try:
        from IPython.display import Markdown

        return Markdown(f"```python\n{src}```")
    except ImportError:  # plain Python: just the text
        return src


def glue(name: str, value) -> None:
    """Hand ``value`` to the book's prose, which shows it where it says ``{glue:text}`name```
    (MyST-NB's ``glue``, output hidden), so no sentence restates a number by hand. Without
    MyST-NB (Colab, a plain Jupyter) there is no book to show it in and this does nothing: the
    chapters print every value they glue."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, value, display=False)
