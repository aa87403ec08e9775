"""kvlib.style: one palette and one spelling for every picture."""

from kvlib.style import COLORS, NO_CACHE, strategy_color, strategy_label


def test_no_cache_is_spelled_one_way():
    assert strategy_label(None) == strategy_label("none") == NO_CACHE == "no cache"
    assert strategy_label("none", 8) == "no cache (window 8)"
    assert strategy_label("sliding", 8) == "sliding (window 8)"


def test_every_strategy_has_its_own_colour():
    names = ["none", "concat", "prealloc", "sliding", "hf-dynamic", "hf-static"]
    assert len({strategy_color(n) for n in names}) == len(names)
    assert strategy_color(None) == COLORS["none"]
