"""kvlib.course: what the chapters share."""

import sys
from types import SimpleNamespace

import kvlib
from kvlib.course import glue, show_source


def test_show_source_is_the_real_source():
    shown = show_source(kvlib.ConcatCache.update)
    text = shown.data if hasattr(shown, "data") else shown
    assert text.startswith("```python\n    def update(self, keys")
    assert "torch.cat" in text


def test_repo_url_matches_the_book_config():
    from pathlib import Path

    config = (Path(__file__).resolve().parents[1] / "_config.yml").read_text()
    assert f"url: {kvlib.REPO_URL}" in config


def test_glue_hands_the_value_to_myst_nb_hidden(monkeypatch):
    calls = []
    fake = SimpleNamespace(glue=lambda *args, **kw: calls.append((args, kw)))
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    glue("qwen_context", 40960)
    assert calls == [(("qwen_context", 40960), {"display": False})]


def test_glue_without_myst_nb_does_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # import fails, as on Colab
    assert glue("anything", 1) is None
