"""Small helpers the chapters share: where the course lives, and showing kvlib's real source."""

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
