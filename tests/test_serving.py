"""Many requests at once: batched generation with padding, the paged cache and the engine.

The reference is always one request generated alone (greedy, concat cache): a batch, a paged
cache or the engine must give every request exactly those tokens."""

import warnings

import pytest
import torch

import kvlib

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["mini-llama", "mini-gpt2"])
def trained(request):
    """A trained model (real margins between tokens) and held-out text to cut prompts from."""
    return kvlib.load_model(request.param), kvlib.held_out(request.param)[0]


def _alone(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return kvlib.generate(model, prompt[None], n, cache="concat").tokens[0]


def _prompts(text: torch.Tensor) -> list[torch.Tensor]:
    return [text[100:117], text[300:305], text[500:540], text[900:901], text[1200:1233]]


@pytest.mark.parametrize("cache", [None, "concat", "prealloc"])
def test_batch_of_different_lengths_gives_each_prompt_its_own_tokens(trained, cache):
    model, text = trained
    prompts = _prompts(text)
    res = kvlib.generate(model, prompts, 16, cache=cache)
    assert [s.shape[0] for s in res.sequences] == [p.shape[0] + 16 for p in prompts]
    for seq, p in zip(res.sequences, prompts, strict=True):
        assert torch.equal(seq, _alone(model, p, 16))


def test_padded_logits_match_alone(make_llama, make_model):
    """Teacher-forced logits of every real token match the prompt alone (tolerance 1e-5)."""
    for model in (make_llama("tiny-llama"), make_model("tiny")):
        torch.manual_seed(1)
        prompts = [torch.randint(0, 500, (n,)) for n in (9, 3, 6)]
        idx, pad = kvlib.pad_prompts(prompts)
        assert pad.tolist() == [0, 6, 3]
        model.set_kv_cache("concat")
        model.set_padding(pad)
        with torch.no_grad():
            batched = model(idx, use_cache=True)  # (B, T, vocab)
            for b, p in enumerate(prompts):
                model.set_kv_cache("concat")
                alone = model(p[None], use_cache=True)[0]
                torch.testing.assert_close(batched[b, int(pad[b]) :], alone, atol=1e-5, rtol=0)


def test_equal_lengths_need_no_padding():
    idx, pad = kvlib.pad_prompts([torch.tensor([1, 2]), torch.tensor([3, 4])])
    assert pad is None and idx.tolist() == [[1, 2], [3, 4]]


def test_eos_ends_one_sequence_and_not_the_others(trained):
    model, text = trained
    prompts = _prompts(text)[:3]
    alone = [_alone(model, p, 12) for p in prompts]
    eos = int(alone[1][prompts[1].shape[0] + 2])  # the third new token of prompt 1
    res = kvlib.generate(model, prompts, 12, cache="concat", eos_id=eos)
    for seq, ref, p in zip(res.sequences, alone, prompts, strict=True):
        new = ref[p.shape[0] :].tolist()
        cut = new.index(eos) + 1 if eos in new else len(new)
        assert seq.tolist() == ref[: p.shape[0] + cut].tolist()
    assert res.sequences[1].shape[0] <= prompts[1].shape[0] + 3


def test_padded_batch_refuses_window_caches(tiny):
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    with pytest.raises(ValueError, match="prompts of different lengths.*kvlib.Engine"):
        kvlib.generate(tiny, prompts, 2, cache="sliding", window=4)
    with pytest.raises(ValueError, match="1-D tensor"):
        kvlib.generate(tiny, [torch.tensor([[1, 2]])], 2)
    with pytest.raises(ValueError, match="empty"):
        kvlib.generate(tiny, [], 2)


# ---------------------------------------------------------------- the engine and its pool


def _workload(text: torch.Tensor, shared: int = 40) -> list[tuple[torch.Tensor, int, int]]:
    """(prompt, max_new_tokens, arrival step): a shared system prompt on half of them."""
    system = text[:shared]
    out = []
    for i in range(8):
        own = text[200 + 97 * i : 200 + 97 * i + 3 + 5 * i]
        prompt = torch.cat([system, own]) if i % 2 else own
        out.append((prompt, 6 + 3 * (i % 4), i // 2))
    return out


def test_engine_gives_every_request_its_own_tokens(trained):
    model, text = trained
    work = _workload(text)
    engine = kvlib.Engine(model, block_size=8, num_blocks=40)
    ids = [engine.add_request(p, n, arrival_step=a) for p, n, a in work]
    out = engine.run()
    for rid, (p, n, _) in zip(ids, work, strict=True):
        assert torch.equal(out[rid], _alone(model, p, n)), rid
    # the shared system prompt was computed once: later requests found its full blocks
    assert engine.stats["prefix_hit_tokens"] >= 3 * 40 // 8 * 8
    assert engine.stats["blocks_used"] == 0  # every block given back
    assert all(r == 0 for r in engine.pool.refs)


def test_engine_leaves_the_model_as_found(tiny, left_as_found):
    kvlib.generate(tiny, torch.tensor([[1, 2, 3]]), 3, cache="concat")
    check = left_as_found(tiny)
    engine = kvlib.Engine(tiny, block_size=4, num_blocks=16)
    engine.add_request(torch.tensor([5, 6, 7, 8, 9]), 4)
    engine.run()
    check()


def test_a_small_pool_makes_requests_wait_not_fail(tiny):
    """Two blocks of 4: one request of up to 8 tokens at a time; the second waits, then gets
    the same tokens it gets alone."""
    engine = kvlib.Engine(tiny, block_size=4, num_blocks=2)
    a = engine.add_request(torch.tensor([1, 2, 3, 4, 5]), 4)
    b = engine.add_request(torch.tensor([7, 8, 9]), 6)
    first = engine.step()
    assert first.joined == [a] and first.waiting == [b]
    out = engine.run()
    rb = engine.requests[b]
    assert rb.first_step > engine.requests[a].first_step
    assert rb.first_step >= engine.requests[a].finish_step
    for rid, p, n in ((a, [1, 2, 3, 4, 5], 4), (b, [7, 8, 9], 6)):
        assert torch.equal(out[rid], _alone(tiny, torch.tensor(p), n))


def test_shared_blocks_are_freed_only_when_unused(tiny):
    system = list(range(10, 26))  # 16 tokens = 2 full blocks of 8
    engine = kvlib.Engine(tiny, block_size=8, num_blocks=12)
    a = engine.add_request(torch.tensor(system + [1, 2]), 2)
    b = engine.add_request(torch.tensor(system + [3]), 20)
    engine.step()  # both join: b finds a's two system blocks
    shared = engine.requests[a].blocks[:2]
    assert engine.requests[b].blocks[:2] == shared and engine.requests[b].cached_tokens == 16
    assert [engine.pool.refs[x] for x in shared] == [2, 2]
    assert engine.stats["blocks_shared"] == 2
    engine.step()  # a finishes (2 tokens): its blocks go, the shared ones stay with b
    assert engine.requests[a].state == "finished"
    assert [engine.pool.refs[x] for x in shared] == [1, 1]
    assert all(x not in engine.pool.free for x in shared)
    engine.run()
    assert all(r == 0 for r in engine.pool.refs)
    # freed but still findable: a third request with the same system prompt hits them
    c = engine.add_request(torch.tensor(system + [4, 5]), 2, arrival_step=engine.clock)
    engine.run()
    assert engine.requests[c].cached_tokens == 16
    assert torch.equal(engine.result(c), _alone(tiny, torch.tensor(system + [4, 5]), 2))


def test_fork_copies_a_shared_block_before_writing(tiny):
    engine = kvlib.Engine(tiny, block_size=8, num_blocks=12)
    a = engine.add_request(torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3]), 10)  # 10 = 8 + 2
    engine.step()
    [child] = engine.fork(a)
    last = engine.requests[a].blocks[-1]
    assert engine.requests[child].blocks == engine.requests[a].blocks
    assert engine.pool.refs[last] == 2
    engine.step()  # both write into the shared partial block: the first writer copies it
    assert engine.requests[a].blocks[-1] != engine.requests[child].blocks[-1]
    out = engine.run()
    alone = _alone(tiny, torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3]), 10)
    assert torch.equal(out[a], alone) and torch.equal(out[child], alone)
    assert all(r == 0 for r in engine.pool.refs)


def test_stats_count_bytes(tiny):
    engine = kvlib.Engine(tiny, block_size=4, num_blocks=8)
    engine.add_request(torch.tensor([1, 2, 3, 4, 5, 6]), 3)  # 6 tokens: 2 blocks, 6 slots used
    engine.step()
    s, per_token = engine.stats, engine.storage.block_nbytes // 4
    cfg = tiny.cfg
    assert per_token == 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 4  # float32
    assert s["blocks_used"] == 2 and s["bytes_reserved"] == 2 * 4 * per_token
    assert s["bytes_used"] == 6 * per_token


def test_bad_input_gets_clear_errors(tiny):
    with pytest.raises(ValueError, match="block_size must be a positive"):
        kvlib.Engine(tiny, block_size=0)
    with pytest.raises(ValueError, match="num_blocks must be a positive"):
        kvlib.Engine(tiny, block_size=4, num_blocks=0)
    engine = kvlib.Engine(tiny, block_size=4, num_blocks=2)
    with pytest.raises(ValueError, match="can never run.*num_blocks"):
        engine.add_request(torch.tensor([1, 2, 3, 4, 5, 6]), 8)
    with pytest.raises(KeyError, match="unknown request id 7"):
        engine.result(7)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match=r"\[0, "):
        engine.add_request(torch.tensor([10**6]), 2)


def test_gpt2_engine_respects_learned_positions(make_model):
    model = make_model("tiny", context_length=16)
    engine = kvlib.Engine(model, block_size=4, num_blocks=16)
    with pytest.raises(ValueError, match="positions"):
        engine.add_request(torch.arange(10), 8)


def test_llama_engine_past_context_warns_once(make_llama):
    model = make_llama("tiny-llama", context_length=16)
    engine = kvlib.Engine(model, block_size=4, num_blocks=16)
    engine.add_request(torch.arange(12), 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = engine.run()
    assert sum("past the" in str(w.message) for w in caught) == 1
    assert torch.equal(out[0], _alone(model, torch.arange(12), 8))


def test_the_pool_keeps_books_and_no_tensors():
    """Ids, references, prefixes and the free queue: the keys and values are the storage's."""
    pool = kvlib.BlockPool(block_size=4, num_blocks=3)
    assert not any(isinstance(v, torch.Tensor) for v in vars(pool).values())
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (0, 1) and list(pool.free) == [2]
    h = pool.register(a, 0, (1, 2, 3, 4))
    pool.share(a)
    new = pool.copy_on_write(a)  # the books' half: the engine copies the tensors
    assert new == 2 and pool.refs == [1, 1, 1]
    pool.release(a)
    assert list(pool.free) == [0] and pool.lookup(0, (1, 2, 3, 4)) == a  # freed, still findable
    assert pool.lookup(h, (1, 2, 3, 4)) is None
    with pytest.raises(RuntimeError, match="not shared"):
        pool.copy_on_write(b)
    assert pool.allocate() == a and pool.lookup(0, (1, 2, 3, 4)) is None  # reused: forgotten


def test_engine_pieces_share_one_storage_and_batch(tiny):
    engine = kvlib.Engine(tiny, block_size=4, num_blocks=6)
    assert engine.storage.keys.shape == (tiny.cfg.n_layers, 6, 4, tiny.cfg.n_heads,
                                         tiny.cfg.head_dim)
    assert all(c.storage is engine.storage and c.batch is engine.batch and c.pager is None
               for c in engine.caches)
    assert engine.pool.num_blocks == engine.storage.num_blocks
