"""kvlib's Llama 3 / Qwen3: every cache against recomputation, the smaller cache of grouped-query
attention, RoPE past the context, and a clear error for every bad config."""

import warnings

import pytest
import torch

import kvlib
from kvlib.memory import MODELS, get_spec, llama_params
from kvlib.models import build_model
from kvlib.models.llama import Llama3RopeScaling, LlamaConfig, RotaryEmbedding, apply_rope

TINY = ["tiny-llama", "tiny-llama-mha", "tiny-llama-mqa", "tiny-qwen3"]
VOCAB = 50257

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(make_llama) -> dict[str, kvlib.LlamaModel]:
    return {name: make_llama(name) for name in TINY}


def ids(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# --- presets ------------------------------------------------------------------------------------


def test_released_presets_have_the_published_parameter_counts():
    published = {"llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248,
                 "llama-3-70b": 70_553_706_496, "qwen3-0.6b": 596_049_920,
                 "qwen3-8b": 8_190_735_360}
    for name, n in published.items():
        cfg = kvlib.PRESETS[name]
        assert llama_params(cfg) == n, name
        with torch.device("meta"):  # the real module tree, no memory
            model = build_model(cfg)
        assert isinstance(model, kvlib.LlamaModel)
        assert sum(p.numel() for p in model.parameters()) == n, name
    # kvlib.memory's table reads the same presets
    assert MODELS["qwen3-0.6b"].context_length == 40960
    assert MODELS["llama-3-8b"] == get_spec("llama-3-8b")
    assert get_spec("llama-3.2-1b").cache_bytes_per_token("bfloat16") == 2 * 16 * 8 * 64 * 2


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets(models, name):
    model, cfg = models[name], models[name].cfg
    assert cfg.vocab_size == VOCAB and not model.hard_context
    assert llama_params(cfg) == sum(p.numel() for p in model.parameters())
    assert (model.lm_head.weight is model.embed_tokens.weight) == cfg.tie_embeddings
    attn = model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (cfg.n_kv_heads * cfg.head_dim, cfg.emb_dim)
    assert attn.q_proj.weight.t().is_contiguous()  # the transposed storage, as GPTModel's
    assert (attn.q_norm is not None) == cfg.qk_norm
    assert kvlib.load_model(name).cfg == cfg


def test_tiny_preset_shapes_and_names(make_llama):
    kv = {name: kvlib.PRESETS[name].n_kv_heads for name in TINY}
    assert kv == {"tiny-llama": 2, "tiny-llama-mha": 4, "tiny-llama-mqa": 1, "tiny-qwen3": 2}
    qwen = kvlib.PRESETS["tiny-qwen3"]
    assert qwen.head_dim * qwen.n_heads != qwen.emb_dim  # as in Qwen3
    names = set(make_llama("tiny-qwen3").state_dict())  # transformers' names, minus "model."
    assert {"embed_tokens.weight", "norm.weight", "lm_head.weight",
            "layers.1.self_attn.k_norm.weight", "layers.1.mlp.gate_proj.weight",
            "layers.1.post_attention_layernorm.weight"} <= names
    assert not any("rope" in n or "cache" in n for n in names)


# --- every cache against recomputation ----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["concat", "prealloc", "sliding"])
@pytest.mark.parametrize("name", TINY)
def test_teacher_forced_logits(teacher_forced, models, name, strategy):
    model = models[name]
    seq = ids((2, 40), seed=1)
    with torch.no_grad():
        ref = model(seq)
    window = model.cfg.context_length if strategy == "sliding" else None
    for prompt_len in (1, 8):
        got = teacher_forced(model, seq, strategy, window, prompt_len)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_greedy_tokens_identical_across_caches(models, name):
    model = models[name]
    prompt = torch.tensor([kvlib.encode("The cache keeps the keys and values of")] * 2)
    ref = kvlib.generate(model, prompt, max_new_tokens=100)
    with torch.no_grad():  # the comparison means something only without near-ties
        logits = model(ref.tokens[:, :-1])[:, prompt.shape[1] - 1 :]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4
    for strategy, window in [("concat", None), ("prealloc", None), ("sliding", 256)]:
        out = kvlib.generate(model, prompt, max_new_tokens=100, cache=strategy, window=window)
        assert torch.equal(out.tokens, ref.tokens), strategy


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("prompt_len", [5, 40])  # shorter and longer than the window
def test_sliding_window_matches_windowed_recomputation(teacher_forced, models, name, prompt_len):
    model, W = models[name], 16
    seq = ids((2, 80), seed=2)
    model.set_kv_cache("none", window=W)
    with torch.no_grad():
        ref = model(seq, use_cache=True)
        full = model(seq)
    got = teacher_forced(model, seq, "sliding", W, prompt_len)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (full[:, W + 1 :] - ref[:, W + 1 :]).abs().max() > 1e-3  # the window bites


def test_sliding_generation_far_past_window_and_chunks(models):
    model, W = models["tiny-llama-mqa"], 12
    prompt = ids((2, 6), seed=3)
    ref = kvlib.generate(model, prompt, max_new_tokens=120, window=W)  # no cache, masked
    out = kvlib.generate(model, prompt, max_new_tokens=120, cache="sliding", window=W)
    assert torch.equal(out.tokens, ref.tokens)
    seq = ids((1, 60), seed=4)  # chunks of several tokens after single steps
    model.set_kv_cache("none", window=W)
    with torch.no_grad():
        ref = model(seq, use_cache=True)
    model.set_kv_cache("sliding", window=W)
    out, t = [], 0
    with torch.no_grad():
        for n in [7, 1, 1, 5, 20, 1, 25]:
            out.append(model(seq[:, t : t + n], use_cache=True))
            t += n
    torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-5, rtol=0)


# --- the cache holds n_kv_heads heads of rotated keys ------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_cache_holds_only_the_kv_heads(models, name):
    model, cfg = models[name], models[name].cfg
    kvlib.generate(model, ids((2, 7), seed=5), max_new_tokens=10, cache="concat")
    tokens = model.caches[0].get_seq_length()
    assert model.caches[0].keys.shape == (2, cfg.n_kv_heads, tokens, cfg.head_dim)
    nbytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * tokens * 4 * 2  # float32, batch 2
    assert model.kv_cache_nbytes == nbytes == get_spec(cfg).cache_bytes(tokens, 2, "float32")
    assert get_spec(cfg).mha_cache_bytes(tokens, 2, "float32") == nbytes * cfg.n_groups


@pytest.mark.kernels
def test_bfloat16_cache(make_llama):
    model = make_llama("tiny-qwen3").to(torch.bfloat16)
    kvlib.generate(model, ids((1, 5), seed=6), max_new_tokens=4, cache="prealloc")
    cfg = model.cfg
    assert model.caches[0].keys.dtype == torch.bfloat16 and model.rope.cos.dtype == torch.bfloat16
    assert model.kv_cache_nbytes == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 9 * 2


def test_keys_are_rotated_at_their_positions_before_caching(models):
    model = models["tiny-qwen3"]  # QK-norm, then RoPE
    seq = ids((1, 7), seed=7)
    model.set_kv_cache("concat")
    with torch.no_grad():
        model(seq[:, :5], use_cache=True)
        model(seq[:, 5:6], use_cache=True)  # position 5 = self.pos
        model(seq[:, 6:7], use_cache=True)
        attn, cfg = model.layers[0].self_attn, model.cfg
        x = model.layers[0].input_layernorm(model.embed_tokens(seq))
        k = attn.k_norm(attn.k_proj(x).view(1, 7, cfg.n_kv_heads, cfg.head_dim)).transpose(1, 2)
        want = apply_rope(k, model.rope.cos[:7], model.rope.sin[:7])
    torch.testing.assert_close(model.caches[0].keys, want, atol=1e-6, rtol=0)


def test_rope_scores_depend_only_on_distance():
    cfg = LlamaConfig.from_preset("tiny-llama")
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.context_length)
    q, k = torch.randn(2, 16, generator=torch.Generator().manual_seed(8))

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rope(q, rope.cos[m], rope.sin[m]) * apply_rope(k, rope.cos[n], rope.sin[n])
                ).sum()

    torch.testing.assert_close(score(3, 1), score(203, 201), atol=1e-4, rtol=0)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


# --- past the context: a warning, once; the RoPE table stays bounded ------------------------------


def test_past_context_warns_once_and_the_table_stays_bounded(make_llama):
    short = make_llama("tiny-llama", context_length=32)
    long = make_llama("tiny-llama", context_length=256)  # same seed: the same weights
    prompt = ids((1, 20), seed=9)
    with pytest.warns(UserWarning) as record:
        out = kvlib.generate(short, prompt, max_new_tokens=40, cache="concat")
    assert [str(w.message)[:38] for w in record] == ["position 32 is past the 32 tokens this"]
    assert short.rope.cos.shape[0] == 32  # the trained positions only
    assert short.rope._pages[1].shape[0] == 32  # the page of positions 32..63
    ref = kvlib.generate(long, prompt, max_new_tokens=40, cache="concat")
    assert torch.equal(out.tokens, ref.tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no error, for any strategy
        for cache, window in [(None, None), ("prealloc", None), ("sliding", 32)]:
            kvlib.generate(short, out.tokens, max_new_tokens=5, cache=cache, window=window)
        with torch.no_grad():
            torch.testing.assert_close(short(out.tokens), long(out.tokens), atol=1e-5, rtol=0)


def test_positions_past_the_table_get_the_numbers_a_longer_table_gives(make_llama):
    short = make_llama("tiny-llama", context_length=32)
    long = make_llama("tiny-llama", context_length=256)
    like = torch.zeros(1)
    for start, T in [(40, 1), (63, 2), (31, 5), (0, 200), (190, 10)]:  # across page edges too
        cos, sin = short.rope(start, T, like)
        assert torch.equal(cos, long.rope.cos[start : start + T])
        assert torch.equal(sin, long.rope.sin[start : start + T])
    rows = torch.tensor([[3, 4], [100, 101]])  # a batch whose rows sit far apart
    assert torch.equal(short.rope.at(rows, like)[0], long.rope.cos[rows][:, None])


def test_a_stream_with_sinks_holds_bounded_rope_numbers(make_llama):
    model = make_llama("tiny-llama", context_length=32)
    model.set_kv_cache("sinks", window=12, n_sink=4)
    held = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # past the trained context, on purpose
        for t in range(400):  # 12 times the context
            model(torch.tensor([[t % 50]]), use_cache=True)
            pages = model.rope._pages
            held.append(model.rope.cos.numel() + (0 if pages is None else pages[1].numel()))
    assert model.rope.cos.shape[0] == 32 and max(held) == 2 * 32 * model.cfg.head_dim


def test_prealloc_still_says_it_is_full(models):
    model = models["tiny-llama"]
    model.set_kv_cache("prealloc", max_len=4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]), use_cache=True)
        with pytest.raises(RuntimeError, match=r"PreallocCache is full: it holds 4 of 4.*max_len"):
            model(torch.tensor([[5]]), use_cache=True)


def test_rope_table_is_recomputed_after_a_cast(make_llama):
    model = make_llama("tiny-llama")
    exact = model.rope.cos.clone()
    model.to(torch.bfloat16).to(torch.float32)
    assert not torch.equal(model.rope.cos, exact)  # bfloat16's rounding came back with the cast
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert torch.equal(model.rope.cos, exact)


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (dict(n_heads=4, n_kv_heads=3), r"n_kv_heads \(3\) must divide n_heads \(4\)"),
    (dict(n_heads=5, n_kv_heads=2), r"n_kv_heads \(2\) must divide n_heads \(5\)"),
    (dict(n_heads=2, n_kv_heads=4), r"n_kv_heads \(4\) must divide n_heads \(2\)"),
    (dict(head_dim=15), r"head_dim \(15\) must be even: RoPE rotates pairs"),
    (dict(n_layers=0), "n_layers must be a positive integer, got 0"),
    (dict(emb_dim=-64), "emb_dim must be a positive integer, got -64"),
    (dict(n_kv_heads=0), "n_kv_heads must be a positive integer"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(context_length=0), "context_length must be a positive integer"),
    (dict(ffn_dim=0), "ffn_dim must be a positive integer"),
    (dict(head_dim=0), "head_dim must be a positive integer"),
    (dict(n_heads=4.0), "n_heads must be a positive integer, got 4.0"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(rope_scaling={"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
     "low_freq_factor < high_freq_factor"),
    (dict(rope_scaling={"factr": 8.0}), r"rope_scaling keys must be among \['factor'"),
])
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_preset("tiny-llama", **overrides)


def test_config_basics():
    cfg = LlamaConfig.from_preset("tiny-llama", rope_scaling={"factor": 4.0})
    assert cfg.rope_scaling == Llama3RopeScaling(factor=4.0)
    assert hash(cfg) == hash(LlamaConfig.from_preset("tiny-llama", rope_scaling={"factor": 4.0}))
    with pytest.raises(ValueError, match="unknown preset 'llama-5'; choose one of"):
        LlamaConfig.from_preset("llama-5")
    with pytest.raises(TypeError, match="no kvlib model family takes a dict"):
        build_model({"n_layers": 2})
    assert set(kvlib.PRESETS) >= {"gpt2", "tiny", "llama-3.2-1b", "qwen3-8b", "tiny-qwen3"}
