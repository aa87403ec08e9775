"""Speculative decoding (kvlib.speculative): greedy gives the tokens of plain decoding for both
drafts, every cache that rolls back and both families; sampling keeps the model's distribution."""

import copy
import math

import pytest
import torch

import kvlib
from kvlib.speculative import Sampling, accept

ROLLING_BACK = [None, "concat", "prealloc", "bf16", "paged", "sliding"]
FAMILIES = ["tiny", "tiny-llama"]


def _models(make_model, make_llama, preset):
    make = make_model if preset == "tiny" else make_llama
    return make(preset, seed=0), make(preset, seed=1)  # the model, and another as a poor draft


def _repeating_prompt(B: int = 1, seed: int = 3) -> torch.Tensor:
    """Text that repeats itself (so prompt lookup finds matches): a random phrase three times."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, 500, (B, 12), generator=g)
    return torch.cat([phrase, phrase, phrase], dim=1)  # (B, 36)


def _options(cache):
    return {"window": 16} if cache == "sliding" else {}  # 36 + 30 tokens: the ring wraps


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("cache", ROLLING_BACK)
def test_greedy_speculation_gives_the_tokens_of_plain_decoding(make_model, make_llama, preset,
                                                               cache, one_thread):
    model, other = _models(make_model, make_llama, preset)
    ids = _repeating_prompt()
    plain = kvlib.generate(model, ids, 30, cache=cache, **_options(cache))
    for draft in ("lookup", other, copy.deepcopy(model)):
        for k in (1, 3, 5):
            out = kvlib.generate(model, ids, 30, cache=cache, draft=draft, draft_tokens=k,
                                 **_options(cache))
            assert torch.equal(out.tokens, plain.tokens), (draft, k)
            s = out.speculation
            assert 0 <= s.accepted <= s.drafted and s.rounds + s.accepted == 29
            if not isinstance(draft, str) and draft is not other:  # the model as its own draft
                assert s.accepted == s.drafted > 0  # every draft kept: the bonus path
    # a poor draft is rejected somewhere: the rollback path ran
    assert kvlib.generate(model, ids, 30, cache=cache, draft=other,
                          **_options(cache)).speculation.acceptance_rate < 1


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("cache", [None, "concat", "prealloc"])
def test_a_padded_batch_gets_the_tokens_of_plain_decoding(make_model, make_llama, preset, cache,
                                                          one_thread):
    model, other = _models(make_model, make_llama, preset)
    rows = _repeating_prompt(B=3)
    prompts = [rows[0], rows[1, 5:], rows[2, 11:]]  # three lengths: left padding
    plain = kvlib.generate(model, prompts, 20, cache=cache)
    for draft in ("lookup", other, copy.deepcopy(model)):
        out = kvlib.generate(model, prompts, 20, cache=cache, draft=draft, draft_tokens=3)
        assert [s.tolist() for s in out.sequences] == [s.tolist() for s in plain.sequences]
        alone = kvlib.generate(model, prompts[2][None], 20, cache=cache, draft=draft)
        assert out.sequences[2].tolist() == alone.tokens[0].tolist()


@pytest.mark.parametrize("draft", ["lookup", "model"])
def test_generate_stream_speculates_with_a_draft(make_llama, draft, one_thread):
    model, other = _models(None, make_llama, "tiny-llama")
    ids = _repeating_prompt()
    plain = [int(s.tokens[0]) for s in kvlib.generate_stream(model, ids, 20, cache="prealloc")]
    steps = list(kvlib.generate_stream(model, ids, 20, cache="prealloc",
                                       draft="lookup" if draft == "lookup" else other,
                                       draft_tokens=3))
    assert [int(s.tokens[0]) for s in steps] == plain  # one Step per token, the same tokens
    assert [s.index for s in steps] == list(range(20))
    if draft == "lookup":  # the text repeats: some rounds commit several tokens
        assert sum(s.round_start for s in steps) < 20
    assert all(s.drafted <= 3 and s.accepted <= s.drafted for s in steps)
    assert sum(s.drafted for s in steps) > 0  # the drafts were checked


def test_prompt_lookup_proposes_what_followed_the_last_match():
    from kvlib.speculative import PromptLookup

    how = Sampling()
    seq = torch.tensor([[5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 4, 6, 7, 0, 0]])  # 2 zeros: room after
    drafts, q = PromptLookup().propose(seq, 13, 4, how)  # the text ends "6 7"
    assert q is None and drafts.tolist() == [[2, 3, 4, 6]]  # after the latest earlier "6 7"
    assert PromptLookup().propose(seq, 13, 2, how)[0].tolist() == [[2, 3]]
    drafts, _ = PromptLookup().propose(torch.tensor([[1, 2, 3, 4]]), 4, 3, how)
    assert drafts.shape == (1, 0)  # no earlier occurrence of 4: nothing proposed
    batch = torch.tensor([[9, 9, 1, 2, 1, 2], [0, 3, 4, 5, 3, 4]])  # row 1: one pad token
    drafts, _ = PromptLookup(pad=torch.tensor([0, 1])).propose(batch, 6, 3, how)
    assert drafts.tolist() == [[1, 2], [5, 3]]  # the fewest any row found: 2


def test_stream_marks_each_round_and_shares_its_time(make_llama, one_thread):
    model = make_llama("tiny-llama", seed=0)
    draft = copy.deepcopy(model)
    steps = list(kvlib.speculative_stream(model, _repeating_prompt(), 12, cache="prealloc",
                                          draft=draft, draft_tokens=3))
    assert [s.index for s in steps] == list(range(12))
    assert not steps[0].round_start  # the prefill's token
    starts = [i for i, s in enumerate(steps) if s.round_start]
    assert starts == [1, 5, 9]  # every draft kept: 4 tokens a round
    assert all(steps[i].drafted == 3 and steps[i].accepted == 3 for i in starts[:2])
    assert steps[1].seconds == steps[2].seconds  # one round's time, shared by its tokens


def test_eos_stops_a_speculative_run_as_it_stops_plain_decoding(make_llama, one_thread):
    model = make_llama("tiny-llama", seed=0)
    ids = _repeating_prompt()
    plain = kvlib.generate(model, ids, 25, cache="prealloc")
    eos = int(plain.tokens[0, ids.shape[1] + 6])  # a token it writes, made the end
    want = kvlib.generate(model, ids, 25, cache="prealloc", eos_id=eos)
    out = kvlib.generate(model, ids, 25, cache="prealloc", eos_id=eos,
                         draft=copy.deepcopy(model), draft_tokens=4)
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in want.sequences]


def _chi_squared(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # never a token the model gives probability 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# 99.9% quantile of the chi-squared distribution with 7 degrees of freedom: a correct sampler
# fails this test once in a thousand seeds (it is seeded, so never here)
CHI2_7_999 = 24.32


@pytest.mark.parametrize("certain", [False, True], ids=["draft model", "lookup"])
def test_the_rejection_rule_keeps_the_models_distribution(certain):
    """Many rounds of one row and one draft token: the first token a round commits (the draft
    if kept, else the residual's draw) is distributed as the model's softmax, and the second
    (after a kept draft: the model's next prediction) too."""
    g = torch.Generator().manual_seed(0)
    V, N = 8, 40_000
    logits = torch.randn(1, 2, V, generator=g) * 1.5  # the model: predictions for d_1, after
    q = torch.softmax(torch.randn(1, 1, V, generator=g), dim=-1)  # the draft's distribution
    how = Sampling(temperature=1.0, generator=g)
    first, after_kept = torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        if certain:  # a lookup draft: always the same token, a point mass
            drafts, dq = torch.tensor([[3]]), None
        else:
            drafts, dq = torch.multinomial(q[0], 1, generator=g), q
        n, nxt, _ = accept(logits, drafts, dq, how)
        if n == 1:
            first[drafts[0, 0]] += 1
            after_kept[nxt[0]] += 1
        else:
            first[nxt[0]] += 1
    p = torch.softmax(logits[0], dim=-1)
    assert _chi_squared(first, p[0]) < CHI2_7_999
    assert _chi_squared(after_kept, p[1]) < CHI2_7_999
    assert after_kept.sum() > N / 20  # the kept path was taken often enough to test


def test_top_k_and_temperature_shape_both_distributions():
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([[[4.0, 3.0, 2.0, -1.0, -2.0]] * 2])  # (1, 2, 5)
    how = Sampling(temperature=0.7, top_k=2, generator=g)
    seen = set()
    for _ in range(300):
        n, nxt, _ = accept(logits, torch.tensor([[2]]), None, how)  # token 2 is outside top 2
        assert n == 0  # never kept: the model gives it probability 0
        seen.add(int(nxt[0]))
    assert seen == {0, 1}


def test_sampled_speculation_is_seeded(make_llama, one_thread):
    model = make_llama("tiny-llama", seed=0)
    draft = make_llama("tiny-llama", seed=1)
    ids = _repeating_prompt()
    runs = [kvlib.generate(model, ids, 20, cache="prealloc", temperature=0.8, top_k=50, seed=7,
                           draft=draft, draft_tokens=3).tokens for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert int(runs[0].max()) < model.cfg.vocab_size


def test_bad_drafts_and_caches_get_clear_errors(make_llama, make_model):
    model = make_llama("tiny-llama", seed=0)
    ids = _repeating_prompt()
    other_vocab = make_llama("tiny-llama", seed=0, vocab_size=600)
    with pytest.raises(ValueError, match="vocabulary"):
        kvlib.generate(model, ids, 5, cache="prealloc", draft=other_vocab)
    with pytest.raises(ValueError, match="at least 1"):
        kvlib.generate(model, ids, 5, cache="prealloc", draft="lookup", draft_tokens=0)
    with pytest.raises(ValueError, match="'lookup'"):
        kvlib.generate(model, ids, 5, cache="prealloc", draft="ngram")
    with pytest.raises(TypeError, match="kvlib model"):
        kvlib.generate(model, ids, 5, cache="prealloc", draft=object())
    with pytest.raises(ValueError, match="itself"):
        kvlib.generate(model, ids, 5, cache="prealloc", draft=model)
    for cache, opts in [("evict", {"budget": 20}), ("sinks", {"window": 16}),
                        ("quantized", {}), ("recompute", {"window": 16})]:
        with pytest.raises(ValueError, match=f"'{cache}' cache cannot"):
            kvlib.generate(model, ids, 5, cache=cache, draft="lookup", **opts)
    assert not math.isnan(kvlib.generate(model, ids, 5, cache="prealloc", draft="lookup")
                          .speculation.tokens_per_round)
