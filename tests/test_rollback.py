"""Rolling a cache back (``crop``): every strategy either rolls back exactly, so generating on
gives the tokens (and logits) of a fresh run on the kept tokens, or refuses with the reason."""

import pytest
import torch

import kvlib

TOL = 1e-5
# A key fed token by token differs from the prefill's in its last float32 bits, which can move a
# quantized code by one level: logits of the quantized cache agree within 1e-4 (tokens exactly).
TOL_QUANTIZED = 1e-4


def _seq(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (1, n), generator=g)


@torch.no_grad()
def _greedy_after(model, first: torch.Tensor, m: int) -> tuple[list[int], torch.Tensor]:
    """Feed ``first`` (1, 1) to the model's caches, then ``m`` greedy tokens; (tokens, logits)."""
    logits, tokens, out = model(first, use_cache=True)[:, -1], [], []
    for _ in range(m):
        out.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        logits = model(nxt, use_cache=True)[:, -1]
    return tokens, torch.stack(out)


@torch.no_grad()
def rolled_back(model, strategy: str, prompt: int, extra: int, keep: int, **options):
    """(tokens and logits after filling ``prompt + extra`` tokens and cropping to ``keep``,
    the same from a fresh cache filled with ``keep`` tokens)."""
    seq = _seq(model, prompt + extra + 1)
    model.set_kv_cache(strategy, **options)
    model(seq[:, :prompt], use_cache=True)
    for t in range(prompt, prompt + extra):
        model(seq[:, t : t + 1], use_cache=True)
    model.crop_kv_cache(keep)
    assert model.pos == keep and all(c.get_seq_length() == keep for c in model.caches)
    mine = _greedy_after(model, seq[:, keep : keep + 1], 8)
    model.set_kv_cache(strategy, **options)
    model(seq[:, :keep], use_cache=True)
    fresh = _greedy_after(model, seq[:, keep : keep + 1], 8)
    return mine, fresh


def assert_same(mine, fresh, tol: float = TOL):
    assert mine[0] == fresh[0]
    torch.testing.assert_close(mine[1], fresh[1], atol=tol, rtol=0)


CASES = [  # (strategy, options, prompt, extra, keep)
    ("concat", {}, 10, 6, 12), ("concat", {}, 10, 6, 3),
    ("prealloc", {"max_len": 64}, 10, 6, 11), ("prealloc", {"max_len": 64}, 10, 6, 1),
    ("bf16", {}, 10, 6, 13),
    ("sliding", {"window": 32}, 10, 6, 12),  # the ring has not wrapped: anything goes
    ("sliding", {"window": 8, "lookahead": 4}, 10, 6, 12),  # back by its whole lookahead
    ("sliding", {"window": 8, "lookahead": 4}, 10, 6, 14),  # inside it
    ("sliding", {"window": 8, "lookahead": 4}, 5, 2, 3),  # before it first wraps
    # 15 tokens: 4 quantized, a tail of 11; a fresh run on 13 quantizes the same 4
    ("quantized", {"bits": 8, "group_size": 4, "residual": 8}, 10, 5, 13),
    ("paged", {"block_size": 4}, 10, 6, 7), ("paged", {"block_size": 4}, 10, 6, 12),
]


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("strategy,options,prompt,extra,keep", CASES)
def test_a_rolled_back_cache_continues_like_a_fresh_one(preset, strategy, options, prompt,
                                                         extra, keep):
    model = kvlib.load_model(preset, seed=5)
    tol = TOL_QUANTIZED if strategy == "quantized" else TOL
    assert_same(*rolled_back(model, strategy, prompt, extra, keep, **options), tol)


def test_sinks_roll_back_until_the_window_first_fills():
    model = kvlib.load_model("tiny-llama", seed=5)
    assert_same(*rolled_back(model, "sinks", 6, 3, 7, window=8, n_sink=2))
    with pytest.raises(ValueError, match="SinkCache is full.*rolls back only until"):
        rolled_back(model, "sinks", 10, 6, 15, window=8, n_sink=2)


def test_a_ring_refuses_past_its_lookahead_and_says_how_far_it_can_go():
    model = kvlib.load_model("tiny", seed=5)
    with pytest.raises(ValueError, match=r"overwritten.*lookahead \(4\).*lookahead=5"):
        rolled_back(model, "sliding", 10, 6, 11, window=8, lookahead=4)
    with pytest.raises(ValueError, match=r"lookahead \(0\).*lookahead=1"):
        rolled_back(model, "sliding", 10, 6, 15, window=8)


def test_quantized_rolls_back_within_its_full_precision_tail_only():
    model = kvlib.load_model("tiny", seed=5)
    with pytest.raises(ValueError, match="would have quantized 0.*no fewer than 12 tokens, not 11"):
        rolled_back(model, "quantized", 10, 5, 11, bits=8, group_size=4, residual=8)


def test_eviction_refuses_to_roll_back():
    model = kvlib.load_model("tiny", seed=5)
    with pytest.raises(ValueError, match="EvictCache cannot roll back"):
        rolled_back(model, "evict", 10, 6, 12, budget=12, n_sink=2)


def test_crop_counts_from_the_end_when_negative_and_never_grows():
    cache = kvlib.ConcatCache()
    k = torch.randn(1, 2, 9, 4)
    cache.update(k, k)
    cache.crop(-3)
    assert cache.get_seq_length() == 6 and torch.equal(cache.keys, k[:, :, :6])
    cache.crop(100)
    assert cache.get_seq_length() == 6
    cache.crop(0)
    assert cache.get_seq_length() == 0 and cache.keys is None
    with pytest.raises(TypeError, match="number of tokens"):
        cache.crop(2.5)
    none = kvlib.NoCache()
    none.update(k, k)
    none.crop(4)
    assert none.get_seq_length() == 4


def test_a_cache_that_has_not_said_how_refuses():
    class Mine(kvlib.KVCache):
        def update(self, keys, values):
            return keys, values

    with pytest.raises(NotImplementedError, match="Mine cannot roll back: write crop"):
        Mine().crop(1)


def test_check_cache_grades_a_readers_rollback():
    class Lazy(kvlib.ConcatCache):  # moves the counter back, keeps the dropped keys
        def crop(self, n: int) -> None:
            self.seen = self._kept(n)

    class Stuck(kvlib.PreallocCache):  # forgets to move the counter
        def crop(self, n: int) -> None:
            pass

    names = [c.name for c in kvlib.check_cache(kvlib.ConcatCache, verbose=False)]
    assert names[-1] == "rollback"
    with pytest.raises(kvlib.CacheCheckError, match="differ from a fresh cache's"):
        kvlib.check_cache(Lazy, verbose=False)
    with pytest.raises(kvlib.CacheCheckError, match=r"crop must set the counter to 5"):
        kvlib.check_cache(Stuck, verbose=False)
