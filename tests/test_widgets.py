"""kvlib.widgets: the widgets build without a display and their handlers update what they show."""

import pytest

pytest.importorskip("ipywidgets")
import ipywidgets as widgets  # noqa: E402

from kvlib.measure import cache_frames_for  # noqa: E402
from kvlib.widgets import HAS_STACK, CacheExplorer, LatencyMonitor, MemoryCalculator  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
PROMPT = "The cache keeps"
STRATEGIES = ("concat", ("sliding", 2))


@pytest.fixture(scope="module")
def explorer(tiny):
    return CacheExplorer(tiny, PROMPT, max_new_tokens=4, strategies=STRATEGIES)


def test_explorer_renders_one_frame_per_step(tiny, explorer):
    runs = cache_frames_for(tiny, PROMPT, 4, STRATEGIES)
    assert explorer.labels == list(runs) == ["concat", "sliding (window 2)"]
    for label, pngs in explorer.pngs.items():
        assert len(pngs) == len(runs[label]) == 4
        assert all(p.startswith(PNG) and len(p) < 40_000 for p in pngs)
        assert len(set(pngs)) == 4  # every step looks different
        assert [f.positions for f in explorer.runs[label]] == [f.positions for f in runs[label]]
    assert (explorer.slider.min, explorer.slider.max) == (0, 3)
    assert repr(explorer) == "CacheExplorer(concat, sliding (window 2); 4 steps)"


@pytest.mark.skipif(not HAS_STACK, reason="client-side frames need ipywidgets >= 8")
def test_explorer_links_slider_to_frames_in_the_browser(explorer):
    assert explorer.client_side
    assert [len(s.children) for s in explorer.stacks] == [4, 4]
    links = {((lk.source[0].model_id, lk.source[1]), (lk.target[0].model_id, lk.target[1]))
             for lk in explorer.links}
    assert ((explorer.play.model_id, "value"), (explorer.slider.model_id, "value")) in links
    assert ((explorer.strategy.model_id, "index"),
            (explorer.view.model_id, "selected_index")) in links
    for s in explorer.stacks:  # the slider picks the frame of every strategy's stack
        assert ((explorer.slider.model_id, "value"), (s.model_id, "selected_index")) in links
    assert {type(lk).__name__ for lk in explorer.links} == {"Link"}  # jslink: no kernel
    # The Python mirror of what the browser does shows the frame for the slider and menu.
    explorer.slider.value, explorer.strategy.value = 2, "sliding (window 2)"
    explorer._show()
    assert explorer.image.value == explorer.pngs["sliding (window 2)"][2]


def test_explorer_without_stack_switches_frames_in_python(tiny):
    ex = CacheExplorer(tiny, PROMPT, max_new_tokens=3, strategies=STRATEGIES, client_side=False)
    assert isinstance(ex.view, widgets.Image)
    assert ex.image.value == ex.pngs["concat"][0]
    ex.slider.value = 2  # the observer runs the handler
    assert ex.image.value == ex.pngs["concat"][2]
    ex.strategy.value = "sliding (window 2)"
    assert ex.image.value == ex.pngs["sliding (window 2)"][2]


def test_latency_monitor_run_updates_plot_progress_summary(tiny):
    mon = LatencyMonitor(tiny, PROMPT, max_new_tokens=10, update_every=4,
                         strategies=(None, "concat", "prealloc"), selected=(None, "concat"))
    assert bytes(mon.image.value) == b"" and "Run" in mon.summary.value
    assert repr(mon) == "LatencyMonitor(no cache, concat; 10 tokens)"
    drawn = []
    mon.image.observe(lambda ch: drawn.append(ch["new"]), names="value")
    runs = mon.run()
    assert list(runs) == ["no cache", "concat"]
    assert all(len(r.seconds) == 10 for r in runs.values())
    assert mon.progress.value == mon.progress.max == 20
    assert len(drawn) == 2 * 2 + 1  # every 4 steps of each run, then the final picture
    assert bytes(mon.image.value).startswith(PNG)
    assert "tokens / s" in mon.summary.value and "concat" in mon.summary.value
    assert not mon.run_button.disabled and mon.stop_button.disabled


def test_latency_monitor_buttons_run_in_a_thread_and_stop(tiny):
    mon = LatencyMonitor(tiny, PROMPT, max_new_tokens=200, update_every=1000)
    mon._on_stop()  # a stop before the run must not cancel it: each run starts fresh
    mon.run_button.click()
    mon._on_stop()
    mon.wait(timeout=60)
    total = sum(len(r.seconds) for r in mon.runs.values())
    assert 0 < total < 3 * 200
    assert "Stopped early" in mon.summary.value
    for box in mon.checks.values():
        box.value = False
    assert mon.run() == {} and "Tick at least one" in mon.summary.value


def test_memory_calculator_recomputes(tiny):
    calc = MemoryCalculator("llama-3-8b", context=8192)
    assert calc.cache_bytes == 2**30 and "1.0 GiB" in calc.numbers.value
    assert repr(calc) == "MemoryCalculator(llama-3-8b, 8,192 tokens x batch 1, bfloat16: 1.0 GiB)"
    first = calc.image.value
    calc.context.value = 32768
    assert calc.cache_bytes == 4 * 2**30 and calc.image.value != first
    calc.batch.value, calc.dtype.value = 2, "float32"
    assert calc.cache_bytes == 16 * 2**30
    calc.model.value = "gpt2"  # the preset fills the fields
    assert (calc.layers.value, calc.kv_heads.value, calc.head_dim.value) == (12, 12, 64)
    assert calc.layers.disabled
    calc.model.value = "custom"
    assert not calc.layers.disabled
    calc.layers.value = 6
    assert calc.cache_bytes == 2 * 6 * 12 * 64 * 4 * 32768 * 2
    calc.batch.value, calc.dtype.value = 1, "bfloat16"
    calc.model.value = "deepseek-v3"  # today's layouts: a latent per token and layer
    assert calc.cache_bytes == 61 * 576 * 2 * 32768 and "576 latent numbers" in calc.numbers.value
    calc.model.value = "gemma-3-27b"  # local layers stop at their window
    assert "52 local layers hold at most 1,024 tokens" in calc.numbers.value
    assert calc.cache_bytes == (10 * 32768 + 52 * 1024) * 2 * 16 * 128 * 2


def test_explorer_leaves_the_readers_model_as_it_was(reader_model, left_as_found):
    """Chapter 2's bug: after the explorer, a later cell reading ``model.h[0].attn.kv_cache``
    must read the reader's own cache, with the reader's tokens and position counter."""
    cache = reader_model.h[0].attn.kv_cache
    check = left_as_found(reader_model)
    CacheExplorer(reader_model, PROMPT, max_new_tokens=3, strategies=STRATEGIES)
    check()
    assert reader_model.h[0].attn.kv_cache is cache


def test_latency_monitor_leaves_the_readers_model_as_it_was(reader_model, left_as_found):
    check = left_as_found(reader_model)
    mon = LatencyMonitor(reader_model, PROMPT, max_new_tokens=10, update_every=5)
    mon.run()
    check()
    mon.run_button.click()  # in a thread, stopped part-way
    mon._on_stop()
    mon.wait(timeout=60)
    check()
