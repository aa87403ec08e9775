"""kvlib.course: what the chapters share."""

import kvlib
from kvlib.course import show_source


def test_show_source_is_the_real_source():
    shown = show_source(kvlib.ConcatCache.update)
    text = shown.data if hasattr(shown, "data") else shown
    assert text.startswith("```python\n    def update(self, keys")
    assert "torch.cat" in text


def test_repo_url_matches_the_book_config():
    from pathlib import Path

    config = (Path(__file__).resolve().parents[1] / "_config.yml").read_text()
    assert f"url: {kvlib.REPO_URL}" in config
