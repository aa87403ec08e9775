"""The paged decode kernel (``kvlib/caches/paged_attention.c``): it gives the attention of the
gather and the fused kernel, the caches really use it, and without it they gather and give the
same tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvlib
from kvlib.caches import paged_kernel

needs_cc = pytest.mark.skipif(paged_kernel.compiler() is None, reason="no C compiler")


@pytest.fixture
def rebuilt(monkeypatch):
    """A fresh ``_library`` cache around the test, so a changed environment is seen."""
    paged_kernel._library.cache_clear()
    paged_kernel._warned.clear()
    yield monkeypatch
    paged_kernel._library.cache_clear()
    paged_kernel._warned.clear()


def _gathered(q, K, V, tables, lengths):
    """The reference: every row's blocks gathered, its first lengths[b] slots attended."""
    B, H, _, D = q.shape
    _, bs, H_kv, _ = K.shape
    S = tables.shape[1] * bs
    k = K.index_select(0, tables.view(-1)).view(B, S, H_kv, D).transpose(1, 2)
    v = V.index_select(0, tables.view(-1)).view(B, S, H_kv, D).transpose(1, 2)
    mask = torch.arange(S) < lengths[:, None]  # (B, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None],
                                          enable_gqa=H != H_kv)


@needs_cc
@pytest.mark.parametrize("D,H,H_kv,bs", [(32, 6, 2, 16), (64, 12, 12, 16), (16, 8, 2, 5),
                                         (8, 4, 1, 1)])
def test_kernel_equals_the_gather(D, H, H_kv, bs):
    """Blocks in a shuffled order, rows of different lengths (one token, a block's end, a
    partial block, the whole table): within float32 rounding of the fused kernel."""
    g = torch.Generator().manual_seed(D + H + bs)
    B, n = 4, 7
    N = B * n + 3
    K, V = (torch.randn(N, bs, H_kv, D, generator=g) for _ in range(2))
    tables = torch.randperm(N, generator=g)[: B * n].view(B, n)
    lengths = torch.tensor([1, bs, 3 * bs + min(2, bs - 1) + 1, n * bs])
    q = torch.randn(B, H, 1, D, generator=g)
    kernel = paged_kernel.decode_kernel(q, K[:B, :1].transpose(1, 2))
    assert kernel is not None
    out = kernel(q, K, V, tables, lengths)
    assert out.shape == (B, H, 1, D)
    torch.testing.assert_close(out, _gathered(q, K, V, tables, lengths), atol=2e-6, rtol=1e-5)


@needs_cc
def test_a_decode_step_runs_the_kernel_and_gives_recomputation_tokens(make_llama, monkeypatch):
    """cache="paged" decodes through the kernel, never through update's gather, and gives the
    tokens of recomputation (no cache)."""
    model = make_llama("tiny-llama")
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator()
                           .manual_seed(1))
    calls = {"kernel": 0, "gather": 0}
    real_call, real_update = paged_kernel._call, kvlib.PagedCache.update

    def counted_call(*a):
        calls["kernel"] += 1
        return real_call(*a)

    def counted_update(self, k, v):
        calls["gather"] += k.shape[2] == 1
        return real_update(self, k, v)

    monkeypatch.setattr(paged_kernel, "_call", counted_call)
    monkeypatch.setattr(kvlib.PagedCache, "update", counted_update)
    paged = kvlib.generate(model, prompt, 12, cache="paged").tokens
    assert torch.equal(paged, kvlib.generate(model, prompt, 12, cache="none").tokens)
    assert calls == {"kernel": 11 * model.cfg.n_layers, "gather": 0}


def test_without_the_kernel_the_cache_gathers_with_the_same_tokens(make_llama, rebuilt):
    model = make_llama("tiny-llama")
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    want = kvlib.generate(model, prompt, 10, cache="prealloc").tokens
    rebuilt.setenv(paged_kernel.ENV, "0")
    assert paged_kernel.decode_kernel(torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 1, 8)) is None
    assert torch.equal(kvlib.generate(model, prompt, 10, cache="paged").tokens, want)


def test_a_failed_build_warns_once_and_falls_back(make_llama, rebuilt, tmp_path):
    """A compiler that is not there: one warning naming the fix, then the gather's tokens."""
    model = make_llama("tiny-llama")
    prompt = torch.tensor([[2, 7, 1, 8, 2, 8]])
    want = kvlib.generate(model, prompt, 6, cache="prealloc").tokens
    rebuilt.setenv("CC", str(tmp_path / "no-such-cc"))
    fix = "(?s)paged decode kernel is off.*set CC.*KVLIB_PAGED_KERNEL=0"
    with pytest.warns(RuntimeWarning, match=fix):
        got = kvlib.generate(model, prompt, 6, cache="paged").tokens
    assert torch.equal(got, want)


@needs_cc
def test_the_kernel_leaves_denormals_alone():
    """Built without linking -ffast-math's start-up code, which would flush every denormal to
    zero in the whole process."""
    assert paged_kernel._library(32, 3) is not None
    tiny = torch.tensor(1e-39, dtype=torch.float32)
    assert (tiny / 2).item() != 0.0


@needs_cc
def test_the_kernel_stays_out_of_autograd_and_other_dtypes():
    q, k = torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 1, 8)
    assert paged_kernel.decode_kernel(q, k) is not None
    assert paged_kernel.decode_kernel(q.requires_grad_(), k) is None
    assert paged_kernel.decode_kernel(q.detach().bfloat16(), k.bfloat16()) is None
    assert paged_kernel.decode_kernel(torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 2, 8)) is None


@needs_cc
def test_the_engine_decodes_rows_of_different_lengths_through_the_kernel(make_llama,
                                                                          monkeypatch):
    model = make_llama("tiny-llama")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g) for n in (3, 17, 30)]
    calls = []
    real = paged_kernel._call
    monkeypatch.setattr(paged_kernel, "_call", lambda *a: calls.append(1) or real(*a))
    engine = kvlib.Engine(model, block_size=4, num_blocks=40)
    ids = [engine.add_request(p, 8) for p in prompts]
    out = engine.run()
    assert calls, "the engine's decode steps did not use the kernel"
    for rid, p in zip(ids, prompts, strict=True):
        assert torch.equal(out[rid], kvlib.generate(model, p[None], 8, cache="none").tokens[0])

