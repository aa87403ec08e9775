"""Beam search in the engine: the beams are rows whose block tables are copied from the beam
they continue; the result is transformers' ``generate(num_beams=k, do_sample=False)`` with no
eos, on the same weights."""

import pytest
import torch

import kvlib
from kvlib.bench.runners import hf_twin

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 10


@pytest.fixture(scope="module")
def random_llama():
    """A random tiny Llama (seed 0) and its transformers twin. Random weights give nearly
    uniform next-token distributions, but the beams' scores still differ by far more than the
    two implementations' rounding (checked below), so no beam flips."""
    torch.manual_seed(0)
    model = kvlib.models.build_model(kvlib.PRESETS["tiny-llama"]).eval()
    hf = hf_twin(model)
    hf.generation_config.eos_token_id = None  # no eos: every beam runs to the end
    prompt = torch.randint(0, model.cfg.vocab_size, (13,),
                           generator=torch.Generator().manual_seed(1))
    return model, hf, prompt


def _hf_beams(hf, prompt: torch.Tensor, k: int):
    with torch.inference_mode():
        out = hf.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt[None]),
                          max_new_tokens=NEW, num_beams=k, do_sample=False,
                          num_return_sequences=k, eos_token_id=None, pad_token_id=0,
                          return_dict_in_generate=True, output_scores=True)
    return list(out.sequences), out.sequences_scores


@pytest.mark.kernels
@pytest.mark.parametrize("k", [2, 4])
def test_beam_search_gives_transformers_beams(random_llama, k):
    model, hf, prompt = random_llama
    ref, ref_scores = _hf_beams(hf, prompt, k)
    engine = kvlib.Engine(model, block_size=4, num_blocks=64)
    rid = engine.add_request(prompt, NEW, num_beams=k)
    out = engine.run()
    assert list(out) == [rid]  # the other beams' rows are the search's, not results
    beams = engine.beams(rid)
    assert all(torch.equal(a, b) for a, b in zip(beams, ref, strict=True))
    assert torch.equal(out[rid], ref[0])  # the result is the best beam
    scores = [r.score for r in engine.requests.values()]  # cumulative log-probabilities
    # transformers divides by the length (length_penalty 1.0): same order, same values
    torch.testing.assert_close(torch.tensor(scores) / NEW, ref_scores, atol=1e-5, rtol=0)
    gaps = torch.tensor(scores).diff().abs()
    assert bool((gaps > 1e-4).all())  # far apart next to rounding: no tie could flip


def test_beams_share_blocks_and_give_them_back(random_llama):
    """Every step, the 4 beams' tables start with the prompt's 3 full blocks, shared by all;
    the rows hold fewer blocks than 4 separate requests would."""
    model, _, prompt = random_llama  # 13 tokens: 3 full blocks of 4 and 1 token
    engine = kvlib.Engine(model, block_size=4, num_blocks=64)
    rid = engine.add_request(prompt, NEW, num_beams=4)
    rows = [r for r in engine.requests.values() if r.beam_of == rid]
    assert [r.id for r in rows] == [rid, rid + 1, rid + 2, rid + 3]
    while engine.pending:
        rec = engine.step()
        if not rec.tables:
            break
        firsts = {tuple(t[:3]) for t in rec.tables.values()}
        assert len(firsts) == 1 and all(rec.refs[b] == 4 for b in firsts.pop())
        s = rec.stats
        assert s["blocks_used"] < s["blocks_unshared"] <= 4 * s["blocks_used"]
    assert all(r == 0 for r in engine.pool.refs)


def test_a_beam_search_among_other_requests_and_chunks(random_llama):
    """The same beams with other requests around and prompts in chunks of a token budget."""
    model, hf, prompt = random_llama
    ref, _ = _hf_beams(hf, prompt, 2)
    engine = kvlib.Engine(model, block_size=4, num_blocks=96, max_batched_tokens=6)
    g = torch.Generator().manual_seed(2)
    others = [engine.add_request(torch.randint(0, 500, (n,), generator=g), 5, arrival_step=a)
              for n, a in ((20, 0), (3, 1), (9, 2))]
    rid = engine.add_request(prompt, NEW, arrival_step=1, num_beams=2)
    out = engine.run()
    assert all(torch.equal(a, b) for a, b in zip(engine.beams(rid), ref, strict=True))
    assert set(out) == {*others, rid}
    assert max(h.tokens for h in engine.history) <= 6


def test_one_beam_is_greedy(tiny):
    prompt = torch.tensor([9, 8, 7, 6, 5])
    engine = kvlib.Engine(tiny, block_size=4, num_blocks=16)
    rid = engine.add_request(prompt, 6, num_beams=1)
    assert torch.equal(engine.run()[rid], kvlib.generate(tiny, prompt[None], 6).tokens[0])


def test_beam_errors_name_the_fix(tiny):
    engine = kvlib.Engine(tiny, block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match=r"can never run\. Ask for fewer rows \(at most 3 fit\)"):
        engine.add_request(torch.arange(8), 9, num_beams=4)  # 2 shared blocks + 2 a beam
    with pytest.raises(ValueError, match="num_beams must be a positive"):
        engine.add_request(torch.arange(8), 5, num_beams=0)
    with pytest.raises(ValueError, match="deterministic.*fork"):
        engine.add_request(torch.arange(8), 5, num_beams=2, temperature=1.0)
    with pytest.raises(ValueError, match="eos_id=None"):
        kvlib.Engine(tiny, block_size=4, eos_id=3).add_request(torch.arange(8), 5, num_beams=2)
    with pytest.raises(ValueError, match="max_batched_tokens=3"):
        kvlib.Engine(tiny, block_size=4, max_batched_tokens=3).add_request(
            torch.arange(8), 5, num_beams=4)
    with pytest.raises(ValueError, match="not a beam search"):
        engine.beams(engine.add_request(torch.arange(8), 5))
