"""kvlib's Gemma 3: local layers get a ring of their window whatever the global layers get, every
strategy that applies gives the tokens of recomputation, and the ones that cannot apply refuse."""

import pytest
import torch

import kvlib
from kvlib.caches import LayerSpec, build
from kvlib.memory import get_spec
from kvlib.models import build_model
from kvlib.models.gemma import GLOBAL, LOCAL, GemmaConfig, GemmaModel

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, W = 50257, 16  # tiny-gemma3: GPT-2's vocabulary, a window of 16


def make(seed: int = 0, **overrides) -> GemmaModel:
    torch.manual_seed(seed)
    model = GemmaModel(GemmaConfig.from_preset("tiny-gemma3", **overrides)).eval()
    with torch.no_grad():  # norm weights start at 0 (a scale of 1): move them, as training would
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def gemma() -> GemmaModel:
    return make()


def ids(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def margin(model, tokens: torch.Tensor, prompt_len: int) -> float:
    """Smallest gap between the best and second-best logit over the greedy steps."""
    with torch.no_grad():
        top2 = model(tokens[:, :-1])[:, prompt_len - 1 :].topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]).min().item()


# --- config and presets -------------------------------------------------------------------------


def test_layer_pattern_and_specs(gemma):
    cfg = gemma.cfg
    assert cfg.layer_types == (LOCAL,) * 5 + (GLOBAL,)  # 5 local : 1 global
    specs = gemma.layer_specs()
    assert [s.window for s in specs] == [W] * 5 + [None]
    local, glob = specs[0].inv_freq, specs[5].inv_freq  # each layer type its own RoPE base
    assert torch.allclose(local, 1.0 / 10000.0 ** (torch.arange(0, 16, 2) / 16))
    assert torch.allclose(glob, 1.0 / 1000000.0 ** (torch.arange(0, 16, 2) / 16))
    assert GemmaConfig(n_layers=7, sliding_window_pattern=3).layer_types == (
        LOCAL, LOCAL, GLOBAL, LOCAL, LOCAL, GLOBAL, LOCAL)
    assert kvlib.load_model("tiny-gemma3").cfg == cfg and gemma.lm_head.weight is \
        gemma.embed_tokens.weight


def test_released_preset_has_the_published_parameter_count():
    with torch.device("meta"):
        model = build_model(kvlib.PRESETS["gemma-3-1b"])
    assert sum(p.numel() for p in model.parameters()) == 999_885_952  # Gemma 3 1B (keras-hub)
    assert [s.window for s in model.layer_specs()].count(None) == 4  # layers 5, 11, 17, 23


@pytest.mark.parametrize("bad,match", [
    (dict(layer_types=(LOCAL,) * 5), "each of the 6 layers"),
    (dict(layer_types=("local",) * 6), "each of the 6 layers"),
    (dict(sliding_window=0), "sliding_window must be a positive"),
    (dict(n_kv_heads=3), "must divide n_heads"),
    (dict(final_softcap=0.0), "final_softcap must be positive"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        GemmaConfig.from_preset("tiny-gemma3", **bad)


# --- one cache per layer, chosen per layer ------------------------------------------------------


def test_prealloc_holds_the_window_on_local_layers_and_everything_on_global(gemma):
    gemma.set_kv_cache("prealloc", max_len=100)
    names = [type(c).__name__ for c in gemma.caches]
    assert names == ["SlidingWindowCache"] * 5 + ["PreallocCache"]
    with torch.no_grad():
        gemma(ids((2, 40), 1), use_cache=True)
    per_token = 2 * 2 * gemma.cfg.n_kv_heads * gemma.cfg.head_dim * 4  # keys + values, batch 2
    assert [c.nbytes for c in gemma.caches] == [W * per_token] * 5 + [100 * per_token]
    assert gemma.kv_cache_nbytes == (5 * W + 100) * per_token
    assert [c.tokens_held for c in gemma.caches] == [W] * 5 + [40]


@pytest.mark.parametrize("strategy,kind", [
    ("none", "NoCache"), ("concat", "ConcatCache"), ("bf16", "BFloat16Cache"),
    ("quantized", "QuantizedCache"), ("paged", "PagedCache"), ("sliding", "SlidingWindowCache")])
def test_every_local_layer_keeps_its_window(gemma, strategy, kind):
    gemma.set_kv_cache(strategy, window=64 if strategy == "sliding" else None)
    caches = gemma.caches
    assert [type(c).__name__ for c in caches[5:]] == [kind]
    assert all(c.window == W for c in caches[:5])
    assert type(caches[0]).__name__ == ("NoCache" if strategy == "none" else "SlidingWindowCache")
    assert caches[5].window == (64 if strategy == "sliding" else None)  # the user's window


def test_paged_storage_serves_the_global_layers_alone(gemma):
    gemma.set_kv_cache("paged", block_size=4)
    assert gemma.caches[5].storage.n_layers == 1 and gemma.caches[5].layer == 0


def test_the_registry_builds_per_layer_without_a_model():
    specs = [LayerSpec(2, 8, 64, window=4), LayerSpec(2, 8, 64)]
    local, glob = build("prealloc", specs, max_len=32)
    assert (type(local).__name__, local.window, glob.capacity) == ("SlidingWindowCache", 4, 32)
    ring, _ = build("sliding", specs, window=8, lookahead=2)
    assert ring.slots == 4 + 2  # a lookahead asked for the rings is every ring's


@pytest.mark.parametrize("strategy", ["sinks", "evict", "recompute"])
def test_strategies_that_change_how_tokens_are_fed_refuse(gemma, strategy):
    options = {"evict": dict(budget=32)}.get(strategy, dict(window=32))
    with pytest.raises(ValueError, match=rf"'{strategy}' cache cannot serve a model with "
                                         r"sliding-window layers \(layers \[0, 1, 2, 3, 4\]"):
        gemma.set_kv_cache(strategy, **options)
    with pytest.raises(ValueError, match="local layers get a ring of their window"):
        kvlib.generate(gemma, ids((1, 5), 2), 3, cache=strategy, **options)


def test_padded_batches_and_the_engine_refuse(gemma):
    prompts = [ids((1, 9), 3)[0], ids((1, 4), 4)[0]]
    with pytest.raises(ValueError, match="a padded batch needs caches .* no window"):
        kvlib.generate(gemma, prompts, 5, cache="concat")
    with pytest.raises(ValueError, match=r"layers \[0, 1, 2, 3, 4\] of this model attend over a "
                                         "window of their own"):
        kvlib.Engine(gemma)
    spec = get_spec("tiny-gemma3")  # the calculator counts the window on the local layers
    gemma.set_kv_cache("concat")
    kvlib.generate(gemma, ids((1, 40), 5), 1, cache="concat")
    assert gemma.kv_cache_nbytes == spec.cache_bytes(40, dtype="float32")


# --- every strategy that applies: the tokens and logits of recomputation ------------------------


def test_the_window_bites(gemma):
    seq = ids((1, 48), 5)
    wide = make(sliding_window=256)  # the same weights, every layer global in effect
    with torch.no_grad():
        local, full = gemma(seq), wide(seq)
    torch.testing.assert_close(local[:, :W], full[:, :W], atol=1e-5, rtol=0)
    assert (local[:, W:] - full[:, W:]).abs().max() > 1e-3


def test_no_cache_masks_the_local_layers_to_their_window(gemma):
    seq = ids((2, 45), 6)
    gemma.set_kv_cache("none")  # nothing kept: the local layers' NoCache carries the window
    with torch.no_grad():
        torch.testing.assert_close(gemma(seq, use_cache=True), gemma(seq), atol=0, rtol=0)


@pytest.mark.parametrize("strategy,window", [("concat", None), ("prealloc", None),
                                             ("sliding", 256), ("paged", None)])
def test_teacher_forced_logits_equal_recomputation(gemma, teacher_forced, strategy, window):
    seq = ids((2, 45), 6)
    with torch.no_grad():
        ref = gemma(seq)
    for prompt_len in (1, 20):  # a prompt shorter and one longer than the window
        got = teacher_forced(gemma, seq, strategy, window, prompt_len)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_chunks_after_decoding_still_see_their_window(gemma):
    seq = ids((1, 70), 7)
    with torch.no_grad():
        ref = gemma(seq)
        gemma.set_kv_cache("concat")
        out, t = [], 0
        for n in [7, 1, 1, 12, 1, 30, 1, 17]:
            out.append(gemma(seq[:, t : t + n], use_cache=True))
            t += n
    torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache", ["concat", "prealloc", "sliding", "paged"])  # exact ones
def test_greedy_tokens_equal_recomputation(gemma, cache):
    prompt = ids((2, 6), 8)
    ref = kvlib.generate(gemma, prompt, 60)  # 66 tokens: the window of 16 turns over four times
    assert margin(gemma, ref.tokens, 6) > 1e-4
    out = kvlib.generate(gemma, prompt, 60, cache=cache, window=256 if cache == "sliding" else None)
    assert torch.equal(out.tokens, ref.tokens)


def test_a_small_global_window_equals_its_windowed_recomputation(gemma):
    prompt = ids((1, 6), 9)
    ref = kvlib.generate(gemma, prompt, 60, window=24)  # no cache, global layers masked to 24
    out = kvlib.generate(gemma, prompt, 60, cache="sliding", window=24)
    assert torch.equal(out.tokens, ref.tokens)
    assert not torch.equal(out.tokens, kvlib.generate(gemma, prompt, 60).tokens)


def test_rollback_within_the_rings(gemma):
    seq = ids((1, 30), 10)
    gemma.set_kv_cache("sliding", window=64, lookahead=4)
    with torch.no_grad():
        gemma(seq[:, :26], use_cache=True)
        gemma.crop_kv_cache(-4)  # the rings kept 4 more tokens than their window
        got = gemma(seq[:, 22:], use_cache=True)
        ref = gemma(seq)[:, 22:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
