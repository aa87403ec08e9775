"""kvlib's DeepSeek-V3 latent attention: a cache of latents only, every strategy that applies
against recomputation, the naive and absorbed ways of attending against each other, and a clear
error for the strategy that cannot apply (transformers' numbers: ``test_hf_deepseek.py``)."""

import pytest
import torch

import kvlib
from kvlib.memory import get_spec
from kvlib.models import build_model
from kvlib.models.deepseek import DeepseekConfig, DeepseekModel

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50257
# Absorbed and naive attention run the same sums in another order: float32 rounding only.
ABSORB_ATOL = 1e-5
# Every strategy that stores the latent as it is, with the options that make it exact here (the
# 45 tokens each test holds fit every budget and full-precision tail).
EXACT = [("concat", {}), ("prealloc", {}), ("sliding", {"window": 256}),
         ("paged", {"block_size": 4}), ("quantized", {"residual": 64}),
         ("evict", {"budget": 64}), ("none", {}), ("recompute", {"window": 256})]


def make(seed: int = 0, **overrides) -> DeepseekModel:
    torch.manual_seed(seed)
    return DeepseekModel(DeepseekConfig.from_preset("tiny-deepseek", **overrides)).eval()


@pytest.fixture(scope="module")
def model() -> DeepseekModel:
    return make()


def ids(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def teacher_forced(model, seq, strategy, prompt_len=6, **options) -> torch.Tensor:
    """Logits of every position of ``seq`` through a cache: a prefill, then one token a step."""
    model.set_kv_cache(strategy, **options)
    with torch.no_grad():
        out = [model(seq[:, :prompt_len], use_cache=True)]
        out += [model(seq[:, t : t + 1], use_cache=True) for t in range(prompt_len, seq.shape[1])]
    return torch.cat(out, dim=1)


# --- the preset ----------------------------------------------------------------------------------


def test_tiny_preset_shapes_and_names(model):
    cfg = model.cfg
    assert cfg == kvlib.PRESETS["tiny-deepseek"] and not model.hard_context
    assert isinstance(build_model(cfg), DeepseekModel)
    assert kvlib.load_model("tiny-deepseek").cfg == cfg
    attn = model.layers[0].self_attn
    assert attn.kv_a_proj_with_mqa.weight.shape == (cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                                    cfg.emb_dim)
    assert attn.kv_b_proj.weight.shape == (cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                           cfg.kv_lora_rank)
    assert attn.q_b_proj.weight.shape == (cfg.n_heads * cfg.qk_head_dim, cfg.q_lora_rank)
    assert attn.q_proj is None and attn.kv_b_proj.weight.t().is_contiguous()
    names = set(model.state_dict())  # transformers' names, minus "model."
    assert {"embed_tokens.weight", "norm.weight", "lm_head.weight",
            "layers.1.self_attn.q_a_proj.weight", "layers.1.self_attn.q_a_layernorm.weight",
            "layers.1.self_attn.kv_a_layernorm.weight", "layers.1.self_attn.o_proj.weight",
            "layers.1.mlp.gate_proj.weight", "layers.1.post_attention_layernorm.weight"} <= names
    assert not any("rope" in n or "cache" in n for n in names)


def test_plain_q_proj_when_q_lora_rank_is_none():
    model = make(q_lora_rank=None)
    attn = model.layers[0].self_attn
    assert attn.q_a_proj is None and attn.q_proj.weight.shape == (4 * 24, 64)
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()
    prompt = ids((1, 5), seed=1)
    ref = kvlib.generate(model, prompt, 20)
    assert torch.equal(kvlib.generate(model, prompt, 20, cache="concat").tokens, ref.tokens)


@pytest.mark.parametrize("overrides,message", [
    ({"kv_lora_rank": 31}, "kv_lora_rank .* must be even"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim .* must be even"),
    ({"q_lora_rank": 0}, "q_lora_rank must be a positive integer or None"),
    ({"n_heads": 0}, "n_heads must be a positive integer"),
])
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        DeepseekConfig.from_preset("tiny-deepseek", **overrides)


def test_attn_impl_is_checked(model):
    with pytest.raises(ValueError, match=r"attn_impl must be one of \('naive', 'absorb'\)"):
        model.attn_impl = "flash"
    assert model.attn_impl == "naive"  # the default: what transformers computes


# --- the latent cache ----------------------------------------------------------------------------


def test_the_cache_holds_only_the_latent(model):
    """layers x tokens x (kv_lora_rank + qk_rope_head_dim) x bytes, whatever the head count."""
    cfg, B, prompt_len, new = model.cfg, 2, 5, 30
    spec = model.layer_specs()[0]
    assert (spec.n_kv_heads, spec.head_dim, spec.latent) == (1, cfg.latent_dim // 2, True)
    per_token = cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # float32
    held = prompt_len + new - 1  # the last token is never fed back
    for strategy, options, tokens, itemsize in [
            ("concat", {}, held, 4), ("prealloc", {}, prompt_len + new, 4),
            ("sliding", {"window": 16}, 16, 4), ("paged", {"block_size": 4}, 36, 4),
            ("bf16", {}, held, 2)]:
        kvlib.generate(model, ids((B, prompt_len), seed=2), new, cache=strategy, **options)
        assert model.kv_cache_nbytes == B * tokens * per_token * itemsize // 4, strategy
    mha = 2 * cfg.n_layers * cfg.n_heads * cfg.qk_head_dim * 4  # per-head keys and values
    assert per_token * 3 < mha
    spec = get_spec("tiny-deepseek")  # the calculator counts the latent, as the cache holds it
    assert spec.cache_bytes(held, batch=B, dtype="float32") == B * held * per_token


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("strategy,options", EXACT)
def test_every_strategy_gives_the_recomputed_tokens(model, impl, strategy, options):
    model.attn_impl = impl
    try:
        prompt = ids((2, 5), seed=3)
        ref = kvlib.generate(model, prompt, 40)  # no cache: the whole text every step
        out = kvlib.generate(model, prompt, 40, cache=strategy, **options)
        assert torch.equal(out.tokens, ref.tokens)
    finally:
        model.attn_impl = "naive"


@pytest.mark.parametrize("strategy,options", [("concat", {}), ("prealloc", {}),
                                              ("sliding", {"window": 256}),
                                              ("paged", {"block_size": 4})])
def test_teacher_forced_logits_equal_recomputation(model, strategy, options):
    seq = ids((2, 40), seed=4)
    with torch.no_grad():
        full = model(seq)
    torch.testing.assert_close(teacher_forced(model, seq, strategy, **options), full,
                               atol=1e-5, rtol=0)


def test_a_small_window_equals_windowed_recomputation(model):
    prompt = ids((2, 6), seed=5)
    ref = kvlib.generate(model, prompt, 60, window=16)  # no cache, attention masked to 16
    out = kvlib.generate(model, prompt, 60, cache="sliding", window=16)
    assert torch.equal(out.tokens, ref.tokens)
    assert not torch.equal(out.tokens, kvlib.generate(model, prompt, 60).tokens)


@pytest.mark.kernels
def test_lossy_strategies_stay_close(model):
    seq = ids((1, 40), seed=6)
    with torch.no_grad():
        full = model(seq)
    for strategy, options in [("bf16", {}), ("quantized", {"bits": 8})]:
        got = teacher_forced(model, seq, strategy, **options)
        torch.testing.assert_close(got, full, atol=1e-2, rtol=0)
    kvlib.generate(model, seq[:, :5], 40, cache="evict", budget=16, n_sink=2, window=6)
    assert model.caches[0].tokens_held == 16  # every head gives up the same token: one latent


def test_sinks_are_refused_with_the_reason(model):
    before = model.caches
    with pytest.raises(ValueError, match=r"'sinks' cache moves cached keys.*caches a latent.*"
                                          r"use 'sliding'.*or 'recompute'"):
        model.set_kv_cache("sinks", window=16)
    with pytest.raises(ValueError, match="moves cached keys"):
        kvlib.generate(model, ids((1, 4), seed=7), 5, cache="sinks", window=16)
    assert model.caches == before  # the refused cache never replaced the ones there


# --- naive and absorbed attention ----------------------------------------------------------------


@pytest.mark.kernels
def test_absorbed_and_naive_attention_agree(model):
    seq = ids((2, 48), seed=8)
    with torch.no_grad():
        naive = model(seq)
        naive_cached = teacher_forced(model, seq, "concat")
        model.attn_impl = "absorb"
        try:
            absorbed = model(seq)
            absorbed_cached = teacher_forced(model, seq, "concat")
        finally:
            model.attn_impl = "naive"
    torch.testing.assert_close(absorbed, naive, atol=ABSORB_ATOL, rtol=0)
    torch.testing.assert_close(absorbed_cached, naive_cached, atol=ABSORB_ATOL, rtol=0)


def test_absorbed_and_naive_give_the_same_tokens(model):
    prompt = ids((2, 5), seed=9)
    naive = kvlib.generate(model, prompt, 60, cache="concat")
    model.attn_impl = "absorb"
    try:
        absorbed = kvlib.generate(model, prompt, 60, cache="concat")
    finally:
        model.attn_impl = "naive"
    assert torch.equal(absorbed.tokens, naive.tokens)


# --- batches, the engine, attention maps ---------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_prompts_of_different_lengths_and_the_engine(model, impl):
    model.attn_impl = impl
    try:
        prompts = [ids((1, n), seed=10 + n)[0] for n in (9, 3, 6)]
        alone = [kvlib.generate(model, p[None], 12, cache="concat").tokens[0] for p in prompts]
        res = kvlib.generate(model, prompts, 12, cache="concat")  # left-padded, masked
        assert all(torch.equal(s, a) for s, a in zip(res.sequences, alone, strict=True))
        engine = kvlib.Engine(model, block_size=4, num_blocks=24)
        rids = [engine.add_request(p, 12, arrival_step=i) for i, p in enumerate(prompts)]
        out = engine.run()
        assert all(torch.equal(out[r], a) for r, a in zip(rids, alone, strict=True))
    finally:
        model.attn_impl = "naive"


def test_attention_maps_for_pictures(model):
    mass = kvlib.attention_to_first(model, ids((1, 24), seed=11), n_first=1)
    assert mass.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert ((mass > 0) & (mass < 1)).all()


def test_a_rolled_back_cache_continues_as_a_fresh_one(model):
    seq = ids((1, 30), seed=12)
    with torch.no_grad():
        full = model(seq)
        for strategy in ("concat", "prealloc", "paged"):
            model.set_kv_cache(strategy)
            model(seq[:, :20], use_cache=True)
            model.crop_kv_cache(12)  # the latents of positions 12.. are dropped
            assert model.pos == 12
            got = model(seq[:, 12:], use_cache=True)
            torch.testing.assert_close(got, full[:, 12:], atol=1e-5, rtol=0)
