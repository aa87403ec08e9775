"""Chunked prefill: a token budget per step, decodes first, prompts in chunks of what is left.
Every request still gets exactly the greedy tokens it gets alone."""

import pytest
import torch

import kvlib

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["mini-llama", "mini-gpt2"])
def trained(request):
    return kvlib.load_model(request.param), kvlib.held_out(request.param)[0]


def _alone(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return kvlib.generate(model, prompt[None], n, cache="concat").tokens[0]


def _workload(text: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
    """(prompt, max_new_tokens, arrival step): short prompts decoding while long ones arrive."""
    system = text[:24]
    return [(text[100:106], 12, 0), (text[300:309], 10, 0),
            (torch.cat([system, text[500:600]]), 6, 2),  # long, shared start
            (text[700:703], 8, 3), (text[900:990], 5, 4),  # long
            (torch.cat([system, text[1100:1105]]), 7, 6)]


@pytest.mark.parametrize("budget", [1, 3, 16, 64, None])
def test_every_request_gets_its_own_tokens_under_a_budget(trained, budget):
    model, text = trained
    work = _workload(text)
    engine = kvlib.Engine(model, block_size=8, num_blocks=80, max_batched_tokens=budget)
    ids = [engine.add_request(p, n, arrival_step=a) for p, n, a in work]
    out = engine.run()
    for rid, (p, n, _) in zip(ids, work, strict=True):
        assert torch.equal(out[rid], _alone(model, p, n)), rid
    h = engine.history
    if budget is not None:
        assert max(r.tokens for r in h) <= budget
    for rid, (p, n, _) in zip(ids, work, strict=True):  # a token in each step it joined or decoded
        assert sum(rid in r.joined for r in h) == 1 and sum(rid in r.decoded for r in h) == n - 1
        computed = sum(r.prefilled.get(rid, 0) for r in h)
        assert computed == p.shape[0] - engine.requests[rid].cached_tokens
    if budget == 3:  # two decodes and one prompt token: the long prompt still progresses
        assert any(len(r.decoded) == 2 and sum(r.prefilled.values()) == 1 for r in h)
    if budget == 16:  # the long prompts ran in chunks, beside decodes
        split = [rid for rid in ids if sum(rid in r.prefilled for r in h) > 1]
        assert ids[2] in split and ids[4] in split
        assert any(r.decoded and r.prefilled for r in h)


def test_a_prompt_in_chunks_shares_its_full_blocks(trained):
    """The second request with the same 48-token start waits for the budget, then finds all six
    blocks the first one computed in chunks."""
    model, text = trained
    system = text[:48]
    a_prompt, b_prompt = torch.cat([system, text[200:205]]), torch.cat([system, text[400:403]])
    engine = kvlib.Engine(model, block_size=8, num_blocks=40, max_batched_tokens=8)
    a = engine.add_request(a_prompt, 4)
    b = engine.add_request(b_prompt, 4, arrival_step=2)
    out = engine.run()
    assert [r.prefilled.get(a, 0) for r in engine.history[:7]] == [8] * 6 + [5]
    assert engine.requests[b].cached_tokens == 48
    assert torch.equal(out[a], _alone(model, a_prompt, 4))
    assert torch.equal(out[b], _alone(model, b_prompt, 4))


def test_a_budget_that_no_prompt_could_use_is_refused(tiny):
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_batched_tokens must be a positive"):
            kvlib.Engine(tiny, block_size=4, max_batched_tokens=bad)
    engine = kvlib.Engine(tiny, block_size=4, num_blocks=32, max_batched_tokens=3)
    a = engine.add_request(torch.arange(5), 6)
    with pytest.raises(ValueError, match="4 rows would decode 4 tokens every step.*at most 3"):
        engine.fork(a, n=3)
    b = engine.add_request(torch.arange(5, 9), 6)
    while engine.requests[b].state != "running":  # 3 tokens a step: both prompts in chunks
        engine.step()
    with pytest.raises(RuntimeError, match="no room to fork.*max_batched_tokens=3"):
        engine.fork(a, n=2)  # 2 rows decode: 2 more would leave no token for any prompt
    [kid] = engine.fork(a)  # 3 rows: they fill the budget; a later prompt waits for one to end
    c = engine.add_request(torch.arange(9, 12), 2, arrival_step=engine.clock)
    rec = engine.step()
    assert rec.waiting == [c] and len(rec.decoded) == 3
    out = engine.run()
    assert torch.equal(out[c], kvlib.generate(tiny, torch.arange(9, 12)[None], 2).tokens[0])
    assert torch.equal(out[kid], out[a])  # greedy: the fork writes the same tokens


def test_under_a_budget_a_step_is_one_forward(trained):
    """Decodes and prompt chunks share one packed forward (vLLM's mixed batch): no step runs the
    model twice, and steps that ran both still give every request its own tokens."""
    model, text = trained
    work = _workload(text)
    engine = kvlib.Engine(model, block_size=8, num_blocks=80, max_batched_tokens=16)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    try:
        ids = [engine.add_request(p, n, arrival_step=a) for p, n, a in work]
        per_step = []
        while engine.pending:
            before = len(calls)
            rec = engine.step()
            per_step.append((calls[before:], rec))
    finally:
        hook.remove()
    assert all(len(shapes) == 1 for shapes, _ in per_step)
    for [shape], rec in per_step:
        if rec.prefilled:  # prompt chunks (and decodes): one packed row of every token
            assert tuple(shape) == (1, rec.tokens)
        else:  # decodes alone: a batch of rows, a token each
            assert tuple(shape) == (len(rec.decoded), 1)
    assert any(rec.decoded and rec.prefilled for _, rec in per_step)
    for rid, (p, n, _) in zip(ids, work, strict=True):
        assert torch.equal(engine.result(rid), _alone(model, p, n)), rid


def test_a_request_shares_blocks_computed_in_the_same_forward(trained):
    """Two prompts with the same 32-token start arriving together under a budget that holds
    both: the second finds the first's four full blocks, which the same packed forward
    computes (each layer writes the new keys before any token reads them)."""
    model, text = trained
    system = text[:32]
    prompts = [torch.cat([system, text[200:205]]), torch.cat([system, text[400:403]])]
    engine = kvlib.Engine(model, block_size=8, num_blocks=40, max_batched_tokens=64)
    a, b = (engine.add_request(p, 4) for p in prompts)
    rec = engine.step()
    assert rec.prefilled == {a: 37, b: 3} and sorted(rec.joined) == [a, b]
    assert engine.requests[b].cached_tokens == 32
    out = engine.run()
    for rid, p in zip((a, b), prompts, strict=True):
        assert torch.equal(out[rid], _alone(model, p, 4))


def test_a_packed_batch_sees_only_its_own_requests_slots():
    from kvlib.caches.paged import PagedBatch

    batch = PagedBatch(block_size=4)
    # request 0 holds 5 tokens in blocks [7, 2] and brings 1; request 1 holds 0 in [3] and brings 2
    last = batch.set_packed([[7, 2], [3]], [5, 0], [1, 2], "cpu")
    assert last == [0, 2]
    assert batch.positions.tolist() == [[5, 0, 1]]
    assert batch.tables.tolist() == [[7, 2, 3]]
    assert batch.write_at.tolist() == [2 * 4 + 1, 3 * 4 + 0, 3 * 4 + 1]
    seen = batch.mask[0, 0].int().tolist()  # (3 tokens, 12 gathered slots)
    assert seen[0] == [1] * 6 + [0] * 6  # its own slots 0..5
    assert seen[1] == [0] * 8 + [1, 0, 0, 0]  # request 1's first slot only
    assert seen[2] == [0] * 8 + [1, 1, 0, 0]


def test_a_batch_of_rows_writes_each_token_in_its_own_block():
    from kvlib.caches.paged import PagedBatch

    batch = PagedBatch(block_size=4)
    # row 0 holds 5 tokens in blocks [7, 2] and row 1 holds 2 in [3]; each brings 2
    batch.set([[7, 2], [3]], [5, 2], 2, "cpu")
    assert batch.tables.tolist() == [[7, 2], [3, 0]]  # padded with block 0
    assert batch.positions.tolist() == [[5, 6], [2, 3]]
    assert batch.write_at.tolist() == [2 * 4 + 1, 2 * 4 + 2, 3 * 4 + 2, 3 * 4 + 3]
    assert batch.mask.shape == (2, 1, 2, 8) and batch.mask.dtype == torch.bool
    assert batch.mask[0, 0].int().tolist() == [[1] * 6 + [0] * 2, [1] * 7 + [0]]
    assert batch.mask[1, 0].int().tolist() == [[1] * 3 + [0] * 5, [1] * 4 + [0] * 4]


def test_index_tensor_is_torch_tensor_of_the_ints():
    from kvlib.caches.paged import index_tensor

    for values in ([], [0], [3, 2**40, 7]):
        t = index_tensor(values, "cpu")
        assert t.dtype == torch.int64 and t.tolist() == values
    with torch.inference_mode():
        assert index_tensor([1, 2], "cpu").tolist() == [1, 2]
