"""kvlib.check_cache: kvlib's own caches pass; each classic mistake is caught and named."""

import pytest
import torch

import kvlib
from kvlib.check import CacheCheckError, check_cache


@pytest.mark.parametrize("cls,window", [(kvlib.ConcatCache, None), (kvlib.PreallocCache, None),
                                        (kvlib.SlidingWindowCache, 4),
                                        (kvlib.SlidingWindowCache, 8),
                                        (kvlib.PagedCache, None)])
def test_kvlib_caches_pass(cls, window, capsys):
    passed = check_cache(cls, window=window)
    names = [c.name for c in passed]
    assert names[:3] == ["interface", "update", "reset"]
    assert names[-3:] == ["logits", "nbytes", "rollback"]  # every one of these can crop
    if window:  # the window's edges: W - 1, W, W + 1 and a prompt longer than W
        assert [n for n in names if n.startswith("tokens")] == [
            f"tokens, prompt of {n}" for n in sorted({window - 1, window, window + 1,
                                                      2 * window + 3})]
    assert f"passed all {len(passed)} checks" in capsys.readouterr().out


class OnlyNew(kvlib.ConcatCache):
    def update(self, keys, values):
        super().update(keys, values)
        return keys, values  # forgets to return what is stored


class OffByOneEverywhere(kvlib.PreallocCache):
    def update(self, keys, values):
        k, v = super().update(keys, values)
        return k[:, :, :-1], v[:, :, :-1]


class NoReset(kvlib.ConcatCache):
    def reset(self):
        pass  # keeps the old text


class WrongSlot(kvlib.SlidingWindowCache):
    def update(self, keys, values):
        if keys.shape[2] != 1 or self.seen < self.window:
            return super().update(keys, values)
        slot = (self.seen + 1) % self.window  # one slot too far: overwrites the wrong token
        self.keys[:, :, slot : slot + 1] = keys
        self.values[:, :, slot : slot + 1] = values
        self.seen += 1
        return self.keys, self.values


class NotBuffers(kvlib.KVCache):
    def __init__(self):
        super().__init__()
        self.store = []  # plain Python: the model cannot see these tensors

    def update(self, keys, values):
        self.store.append((keys, values))
        self.seen += keys.shape[2]
        return (torch.cat([k for k, _ in self.store], dim=2),
                torch.cat([v for _, v in self.store], dim=2))

    def reset(self):
        super().reset()
        self.store = []


class NotACache:
    def update(self, keys, values):
        return keys, values


@pytest.mark.parametrize("cls,window,fault", [
    (OnlyNew, None, "returned 1 keys, expected 6: did update return the stored keys or only "
                    "the new ones?"),
    (OffByOneEverywhere, None, "after a prefill of 5 tokens your cache returned 4 keys"),
    (NoReset, None, "after reset() get_seq_length() is 5: reset must forget every token"),
    (WrongSlot, 4, "check which slot the token at position p goes to (p % window)"),
    (NotBuffers, None, "nbytes is 0 while the cache holds tokens: register keys and values as "
                       "buffers"),
    (NotACache, None, "is not a kvlib.KVCache: subclass it"),
])
def test_each_fault_is_named(cls, window, fault):
    with pytest.raises(CacheCheckError) as err:
        check_cache(cls, window=window, verbose=False)
    assert fault in str(err.value)


def test_exported():
    assert kvlib.check_cache is check_cache


def test_check_absorbed_grades_a_readers_absorbed_query():
    good = kvlib.check_absorbed(lambda q, w: torch.einsum("bhtd,hdr->bhtr", q, w),
                                verbose=False)
    assert "exactly" in good
    with pytest.raises(kvlib.CacheCheckError, match=r"must be \(B, H, T, R\)"):
        kvlib.check_absorbed(lambda q, w: q, verbose=False)
    with pytest.raises(kvlib.CacheCheckError, match="its own w_uk"):
        kvlib.check_absorbed(lambda q, w: torch.einsum("bhtd,hdr->bhtr", q, w.flip(0)),
                             verbose=False)
    with pytest.raises(kvlib.CacheCheckError, match="differ from the decompressed"):
        kvlib.check_absorbed(lambda q, w: torch.einsum("bhtd,hdr->bhtr", q, w) * 2,
                             verbose=False)


# --- sink caches: graded against kvlib's SinkCache on a small Llama -----------------------------


class StaleSinks(kvlib.SinkCache):
    """Never moves the sink keys: they stay at positions 0 .. n_sink - 1."""

    def update(self, keys, values):
        S = self.n_sink
        k, v = super().update(keys, values)
        if self.seen > self.capacity and S:
            self.keys[:, :, :S] = self.sink_keys  # undo the rotation
        return self.keys if self.seen > self.capacity else k, v


class PilingRotations(kvlib.SinkCache):
    """Moves the last moved copy again each step instead of the unmoved one."""

    def update(self, keys, values):
        from kvlib.caches.streaming import rotate

        k, v = super().update(keys, values)
        if self.seen > self.capacity + 1 and self.n_sink:
            self.sink_keys = self.keys[:, :, : self.n_sink].clone()  # the moved copy
            self.keys[:, :, : self.n_sink] = rotate(self.sink_keys, self.inv_freq, 1)
        return k, v


@pytest.mark.parametrize("n_sink", [1, 2, 4])
def test_the_sink_cache_passes_against_itself(n_sink, capsys):
    passed = check_cache(kvlib.SinkCache, window=8, n_sink=n_sink)
    names = [c.name for c in passed]
    W = 8 + n_sink  # the cache's capacity: its edges are where it fills
    assert [n for n in names if n.startswith("tokens")] == [
        f"tokens, prompt of {n}" for n in sorted({W - 1, W, W + 1, 2 * W + 3})]
    assert names[-3:] == ["logits", "nbytes", "rollback"]
    assert "SinkCache's" in capsys.readouterr().out


@pytest.mark.parametrize("cls", [StaleSinks, PilingRotations])
def test_sinks_left_behind_are_caught_with_the_hint(cls):
    with pytest.raises(CacheCheckError, match=r"sink keys must sit just before the window"):
        check_cache(cls, window=8, n_sink=2, verbose=False)


def test_n_sink_asks_for_a_sink_cache():
    with pytest.raises(CacheCheckError, match=r"subclass kvlib.SinkCache"):
        check_cache(kvlib.SlidingWindowCache, window=8, n_sink=2, verbose=False)
