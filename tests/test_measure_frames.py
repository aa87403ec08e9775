"""kvlib.measure.frames: the frames are the caches' real state; the model comes back as it was."""

import pytest
import torch

import kvlib
from kvlib.measure import cache_frames, cache_frames_for
from kvlib.memory import get_spec


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
def test_frames_are_the_real_cache_state(tiny, prompt, strategy, window, new):
    T = len(kvlib.encode(prompt))
    frames = cache_frames(tiny, prompt, new, strategy, window, layer=1)
    assert [f.step for f in frames] == list(range(new))
    # Replay the same generation and read the real buffers after every step.
    buffers, lengths = [], []
    for _ in kvlib.generate_stream(tiny, torch.tensor([kvlib.encode(prompt)]), new,
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


def test_frame_bytes_match_the_formula(tiny, prompt):
    spec = get_spec(tiny.cfg)
    for f in cache_frames(tiny, prompt, 5, "concat"):  # all layers, float32
        assert f.nbytes == spec.cache_bytes(f.cache_tokens, dtype="float32")
        assert f.layer_nbytes * tiny.cfg.n_layers == f.nbytes
    frames = cache_frames(tiny, prompt, 5, "sliding", window=3)
    assert frames[-1].nbytes == spec.cache_bytes(3, dtype="float32")


def test_frames_name_the_cache_they_read(tiny, prompt):
    runs = cache_frames_for(tiny, prompt, 3, ["concat", "prealloc", ("sliding", 2)])
    assert list(runs) == ["concat", "prealloc", "sliding (window 2)"]
    assert [(fs[0].strategy, fs[0].window, fs[0].capacity) for fs in runs.values()] == [
        ("concat", None, None), ("prealloc", None, 8), ("sliding", 2, 2)]


def test_explorer_rejects_no_cache(tiny, prompt):
    with pytest.raises(ValueError, match="'none' keeps no tokens: choose one that does"):
        cache_frames(tiny, prompt, 3, "none")
    with pytest.raises(ValueError, match="'quantized' cache keeps its keys otherwise"):
        cache_frames(tiny, prompt, 3, "quantized")


def test_frames_hand_the_model_back(reader_model, left_as_found, prompt):
    check = left_as_found(reader_model)
    cache_frames(reader_model, prompt, 4, "prealloc")
    check()
    cache_frames_for(reader_model, prompt, 4, ["concat", ("sliding", 2)])
    check()
    with pytest.raises(IndexError):  # fails after the first step has swapped the caches in
        cache_frames(reader_model, prompt, 4, "concat", layer=5)
    check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_frames_of_a_gpu_model_from_a_text_prompt(tiny, reader_model, left_as_found, prompt):
    model = reader_model.to("cuda")  # the prompt's ids follow the model to its device
    check = left_as_found(model)
    frames = cache_frames(model, prompt, 4, "sliding", window=2)
    check()
    assert [f.positions for f in frames] == [
        f.positions for f in cache_frames(tiny, prompt, 4, "sliding", window=2)]
