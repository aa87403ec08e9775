"""The engine's sampling: each request draws from its own seeded generator, so it gets the tokens
``kvlib.generate`` gives it alone with the same seed, whatever else runs; ``fork`` samples ``n``
answers of one prompt that is computed and stored once."""

import pytest
import torch

import kvlib

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["mini-llama", "mini-gpt2"])
def trained(request):
    return kvlib.load_model(request.param), kvlib.held_out(request.param)[0]


def _sampled(model, prompt, n, seed, temperature=0.9, top_k=None):
    return kvlib.generate(model, prompt[None], n, cache="concat", temperature=temperature,
                          top_k=top_k, seed=seed).tokens[0]


def _busy(engine: kvlib.Engine, text: torch.Tensor) -> None:
    """Other requests around: greedy and sampled, short and long, arriving over the steps."""
    for i in range(6):
        own = text[1000 + 80 * i : 1000 + 80 * i + 4 + 11 * i]
        engine.add_request(own, 5 + 2 * i, arrival_step=i // 2,
                           temperature=0.0 if i % 2 else 1.2, seed=100 + i)


@pytest.mark.parametrize("top_k", [None, 20])
def test_a_sampled_request_gets_its_tokens_alone_and_in_a_busy_batch(trained, top_k):
    model, text = trained
    prompt, n = text[200:231], 14
    alone = kvlib.Engine(model, block_size=8, num_blocks=64)
    a = alone.add_request(prompt, n, temperature=0.9, top_k=top_k, seed=7)
    busy = kvlib.Engine(model, block_size=8, num_blocks=64)
    _busy(busy, text)
    b = busy.add_request(prompt, n, arrival_step=1, temperature=0.9, top_k=top_k, seed=7)
    ref = _sampled(model, prompt, n, 7, top_k=top_k)
    assert torch.equal(alone.run()[a], ref)
    assert torch.equal(busy.run()[b], ref)
    other = _sampled(model, prompt, n, 8, top_k=top_k)  # another seed: another answer
    assert not torch.equal(other, ref)


def test_greedy_stays_the_default_and_seed_none_follows_torch(tiny):
    prompt = torch.tensor([5, 6, 7, 8])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        engine = kvlib.Engine(tiny, block_size=4, num_blocks=16)
        g = engine.add_request(prompt, 6)
        s = engine.add_request(prompt, 6, temperature=1.0)  # seed drawn from torch's generator
        out = engine.run()
        assert engine.requests[g].generator is None and engine.requests[s].seed is not None
        runs.append(out[s])
        assert torch.equal(out[g], kvlib.generate(tiny, prompt[None], 6).tokens[0])
    assert torch.equal(runs[0], runs[1])


def test_forked_before_it_starts_n_samples_share_one_prompt(trained):
    """A request and 3 forks: the prompt is prefilled once, every row gets the tokens generate
    gives with its seed, and the rows hold fewer blocks than 4 requests would."""
    model, text = trained
    prompt, n = text[300:370], 16  # 70 tokens = 4 full blocks of 16 and a partial one
    engine = kvlib.Engine(model, block_size=16, num_blocks=40)
    a = engine.add_request(prompt, n, temperature=1.0, seed=0)
    kids = engine.fork(a, n=3, seed=10)
    assert [engine.requests[k].seed for k in kids] == [10, 11, 12]
    first = engine.step()
    assert first.prefilled == {a: 70} and first.joined == [a, *kids]
    tables = [engine.requests[r].blocks for r in (a, *kids)]
    assert all(t == tables[0] for t in tables) and engine.pool.refs[tables[0][0]] == 4
    out = engine.run()
    for rid, seed in zip((a, *kids), (0, 10, 11, 12), strict=True):
        assert torch.equal(out[rid], _sampled(model, prompt, n, seed, temperature=1.0)), rid
    # the last step before they finish: 85 tokens = 6 blocks a row if nothing were shared
    last = engine.history[-2].stats
    assert last["blocks_unshared"] == 4 * 6  # what 4 independent requests would hold
    assert last["blocks_used"] == 4 + 4 * 2  # the 4 full prompt blocks once, 2 own blocks a row
    saved = 1 - last["blocks_used"] / last["blocks_unshared"]
    assert saved == pytest.approx(0.5)
    assert all(r == 0 for r in engine.pool.refs)


def test_a_fork_of_a_running_request_continues_from_its_text(trained):
    """A fork after 5 tokens shares them and the blocks; its own draws then continue the text
    as generate does from prompt + those 5 tokens, with the fork's seed."""
    model, text = trained
    prompt = text[500:523]
    engine = kvlib.Engine(model, block_size=8, num_blocks=40)
    a = engine.add_request(prompt, 12, temperature=1.0, seed=1)
    for _ in range(5):
        engine.step()
    so_far = engine.result(a)
    [kid] = engine.fork(a, seed=42)
    assert engine.requests[kid].blocks == engine.requests[a].blocks
    out = engine.run()
    assert torch.equal(out[a], _sampled(model, prompt, 12, 1, temperature=1.0))
    assert torch.equal(out[kid], _sampled(model, so_far, 7, 42, temperature=1.0))


def test_fork_errors_name_the_fix(tiny):
    engine = kvlib.Engine(tiny, block_size=4, num_blocks=12)
    a = engine.add_request(torch.tensor([1, 2, 3, 4, 5, 6]), 3, temperature=1.0, seed=0)
    with pytest.raises(ValueError, match="n must be a positive"):
        engine.fork(a, n=0)
    with pytest.raises(ValueError, match=r"can never run\. Ask for fewer rows \(at most 11 fit\)"):
        engine.fork(a, n=11)  # each row may hold 2 blocks: the full prompt block shared, 1 own
    engine.run()
    with pytest.raises(ValueError, match="has finished.*fork a request while it waits or runs"):
        engine.fork(a)
    b = engine.add_request(torch.arange(20, 29), 8, arrival_step=engine.clock)  # 4 blocks at most
    engine.add_request(torch.arange(40, 52), 9, arrival_step=engine.clock)  # 5 blocks at most
    engine.step()  # both hold 3 blocks; the pool has 6 free and has promised 1 + 2 of them
    with pytest.raises(RuntimeError, match="no room to fork request 1 now.*num_blocks"):
        engine.fork(b, n=2)  # 2 blocks to grow into and 2 copies of the shared partial block
    assert len(engine.requests) == 3
    assert all(engine.pool.refs[x] == 1 for x in engine.requests[b].blocks)
    beams = engine.add_request(torch.tensor([1, 2, 3]), 2, num_beams=2)
    with pytest.raises(ValueError, match="beam search"):
        engine.fork(beams)
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request(torch.tensor([1]), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        engine.add_request(torch.tensor([1]), 2, temperature=1.0, top_k=0)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_a_tight_pool_keeps_its_promises(tiny, seed):
    """Forks, beams and plain requests in a pool that fills up, with and without a budget:
    after every step the free blocks cover everything promised (growth and the copies
    copy-on-write still owes), so no block is ever missing; at the end all are back. (Without
    the copies owed, these seeds run the pool dry.)"""
    g = torch.Generator().manual_seed(seed)
    for budget in (None, 6):
        engine = kvlib.Engine(tiny, block_size=4, num_blocks=16, max_batched_tokens=budget)
        for i in range(8):
            prompt = torch.randint(0, 500, (int(torch.randint(1, 14, (1,), generator=g)),),
                                   generator=g)
            n, kind = int(torch.randint(2, 9, (1,), generator=g)), i % 3
            rid = engine.add_request(prompt, n, arrival_step=i // 2, num_beams=2 if kind == 2
                                     else 1, temperature=1.0 if kind == 1 else 0.0, seed=i)
            if kind == 1:
                engine.fork(rid, n=3, seed=10 * i)
        spare = []
        while engine.pending:
            engine.step()
            spare.append(len(engine.pool.free) - engine._promised())
            if budget is not None:
                assert engine.history[-1].tokens <= budget
        assert min(spare) >= 0 and any(h.waiting for h in engine.history)  # it was tight
        assert all(r == 0 for r in engine.pool.refs)
