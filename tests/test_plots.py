"""kvlib.plots and kvlib.memory: the pictures show the caches' real state and the real sizes."""

import pytest
import torch
from conftest import _make_model as make_model
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure

import kvlib
from kvlib.memory import MODELS, get_spec, gpt2_params
from kvlib.plots import (
    cache_frames,
    cache_frames_for,
    figure_png,
    measure_latency,
    plot_cache_sizes,
    plot_cache_state,
    plot_latency,
    plot_memory,
)

PROMPT = "The cache keeps the keys"  # 5 tokens


def layer_keys(model: kvlib.GPTModel, tokens: list[int], layer: int,
               window: int | None) -> torch.Tensor:
    """Keys ``(H, T, D)`` that layer ``layer`` computes for every position in one pass without a
    cache (attention masked to ``window``, as the sliding cache sees it)."""
    got = {}
    attn = model.h[layer].attn
    hook = attn.c_attn.register_forward_hook(lambda m, i, o: got.setdefault("qkv", o))
    try:
        model.set_kv_cache("none", window=window)
        with torch.no_grad():
            model(torch.tensor([tokens]), use_cache=True)
    finally:
        hook.remove()
    C = model.cfg.emb_dim
    k = got["qkv"][0, :, C : 2 * C]  # (T, C)
    return k.view(len(tokens), attn.n_heads, attn.head_dim).transpose(0, 1)  # (H, T, D)


@pytest.mark.parametrize("strategy,window,new", [
    ("concat", None, 6), ("prealloc", None, 6), ("sliding", 4, 9), ("sliding", 3, 4),
])
def test_frames_are_the_real_cache_state(tiny, strategy, window, new):
    T = len(kvlib.encode(PROMPT))
    frames = cache_frames(tiny, PROMPT, new, strategy, window, layer=1)
    assert [f.step for f in frames] == list(range(new))
    # Replay the same generation and read the real buffers after every step.
    buffers, lengths = [], []
    for _ in kvlib.generate_stream(tiny, torch.tensor([kvlib.encode(PROMPT)]), new,
                                   cache=strategy, window=window):
        buffers.append(tiny.caches[1].keys.clone())
        lengths.append(tiny.caches[1].get_seq_length())
    ref = layer_keys(tiny, frames[-1].tokens, 1, window)  # (H, T_final, D)
    for f, keys, seen in zip(frames, buffers, lengths, strict=True):
        assert f.cache_tokens == seen == T + f.step  # the newest token is cached at the next step
        assert len(f.positions) == keys.shape[2]  # one entry per slot of the real buffer
        for s, p in enumerate(f.positions):  # every filled slot holds that position's keys
            if p >= 0:
                torch.testing.assert_close(keys[0, :, s], ref[:, p], atol=1e-5, rtol=1e-4)
        held = sorted(p for p in f.positions if p >= 0)
        cap = window or seen
        assert f.filled == min(seen, cap)
        assert held == list(range(seen - min(seen, cap), seen))  # the newest min(seen, cap)
        if f.step > 0:  # a decode step writes one slot: the one now holding the newest position
            assert len(f.written) == 1 and f.positions[f.written[0]] == seen - 1
    if strategy == "sliding":
        for prev, f in zip(frames[:-1], frames[1:], strict=True):
            old = [p for p in prev.positions if p >= 0]
            if len(old) == window:  # full: the step overwrote the oldest position
                assert f.evicted == [min(old)]
                assert prev.positions[f.written[0]] == min(old)
            else:
                assert f.evicted == []
        assert frames[-1].nbytes == frames[0].nbytes  # a ring: memory stays put
    if strategy == "concat":
        assert [len(f.positions) for f in frames] == [T + i for i in range(new)]
    if strategy == "prealloc":  # allocated once for prompt + new tokens, filled from the left
        assert {len(f.positions) for f in frames} == {T + new}
        assert {f.nbytes for f in frames} == {frames[0].nbytes}


def test_frame_bytes_match_the_formula(tiny):
    spec = get_spec(tiny.cfg)
    for f in cache_frames(tiny, PROMPT, 5, "concat"):  # all layers, float32
        assert f.nbytes == spec.cache_bytes(f.cache_tokens, dtype="float32")
        assert f.layer_nbytes * tiny.cfg.n_layers == f.nbytes
    frames = cache_frames(tiny, PROMPT, 5, "sliding", window=3)
    assert frames[-1].nbytes == spec.cache_bytes(3, dtype="float32")


def drawn_slots(fig: Figure) -> tuple[list[int], int]:
    """Positions written in the slot row of the picture (left to right) and the number of boxes
    drawn with the 'written now' edge."""
    ax = fig.axes[0]
    texts = sorted((t.get_position()[0], t.get_text()) for t in ax.texts
                   if abs(t.get_position()[1] - 0.5) < 1e-6)
    red = 0
    for coll in ax.collections:
        if isinstance(coll, PatchCollection):
            red += sum(1 for c, w in zip(coll.get_edgecolors(), coll.get_linewidths(),
                                             strict=True)
                       if w > 2 and c[0] > 0.8 and c[1] < 0.2)
    return [int(t.split(":")[0]) for _, t in texts], red


@pytest.mark.parametrize("spec", ["concat", "prealloc", ("sliding", 4)])
def test_picture_shows_the_frames(tiny, spec):
    runs = cache_frames_for(tiny, PROMPT, 7, [spec, "concat"])
    label = next(iter(runs))
    for f in runs[label]:
        fig = plot_cache_state(runs, label, f.step)
        positions, red = drawn_slots(fig)
        assert positions == [p for p in f.positions if p >= 0]  # slot order, as in the buffer
        assert red == len(f.written)
        ax = fig.axes[0]
        titles = [t.get_text() for t in ax.texts if t.get_transform() == ax.transAxes]
        assert len(titles) == 1 and f"step {f.step} " in titles[0]
    with pytest.raises(ValueError, match="step must lie"):
        plot_cache_state(runs, label, 99)


def test_explorer_rejects_no_cache(tiny):
    with pytest.raises(ValueError, match="choose 'concat'"):
        cache_frames(tiny, PROMPT, 3, "none")


def test_latency_measures_every_step(tiny):
    seen = []
    runs = measure_latency(tiny, PROMPT, 6, [None, "concat", ("sliding", 4)],
                           on_step=lambda run, i: seen.append((run.label, i)))
    assert list(runs) == ["no cache", "concat", "sliding (window 4)"]
    T = len(kvlib.encode(PROMPT))
    for run in runs.values():
        assert run.seq_lens == [T + 1 + i for i in range(6)]
        assert len(run.seconds) == 6 and all(s > 0 for s in run.seconds)
        assert run.decode_tokens_per_s == pytest.approx(5 / sum(run.seconds[1:]))
    assert len(seen) == 18
    assert runs["no cache"].cache_nbytes == [0] * 6
    fig = plot_latency(runs)
    assert len(fig.axes[0].lines) == 3
    assert [b.get_width() for b in fig.axes[1].patches] == pytest.approx(
        [r.decode_tokens_per_s for r in runs.values()])


def test_latency_stops_when_asked(tiny):
    calls = []
    runs = measure_latency(tiny, PROMPT, 20, [None, "concat"],
                           on_step=lambda run, i: calls.append(i),
                           should_stop=lambda: len(calls) >= 3)
    assert list(runs) == ["no cache"] and len(runs["no cache"].seconds) == 3


def test_gpt2_parameter_counts_match_the_model(tiny, gpt2):
    for model in (tiny, gpt2):
        assert gpt2_params(model.cfg) == sum(p.numel() for p in model.parameters())
    assert MODELS["gpt2"].n_params == sum(p.numel() for p in gpt2.parameters())


def test_published_model_sizes():
    # Parameter counts from each model card / safetensors index; the formula must reproduce them.
    assert MODELS["llama-3-8b"].n_params == 8_030_261_248
    assert MODELS["llama-3-70b"].n_params == 70_553_706_496
    assert MODELS["qwen3-0.6b"].n_params == 596_049_920
    assert MODELS["qwen3-8b"].n_params == 8_190_735_360
    llama = MODELS["llama-3-8b"]  # 2 x 32 x 8 x 128 x 2 bytes = 128 KiB per token in bf16
    assert llama.cache_bytes_per_token("bfloat16") == 128 * 1024
    assert llama.cache_bytes(8192, batch=1) == 2**30
    assert llama.mha_cache_bytes(8192) == 4 * llama.cache_bytes(8192)  # 32 query / 8 kv heads


def test_cache_bytes_formula_matches_kvlib(tiny):
    prompt = torch.tensor([kvlib.encode(PROMPT)])
    kvlib.generate(tiny, prompt, 4, cache="concat")
    tokens = tiny.caches[0].get_seq_length()
    assert tiny.kv_cache_nbytes == get_spec(tiny.cfg).cache_bytes(tokens, dtype="float32")
    half = make_model("tiny").to(torch.bfloat16)
    kvlib.generate(half, prompt, 4, cache="concat")
    assert half.kv_cache_nbytes == get_spec(half.cfg).cache_bytes(tokens, dtype="bfloat16")


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


def test_figure_png_is_a_small_png():
    png = figure_png(plot_memory("gpt2"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 60_000
