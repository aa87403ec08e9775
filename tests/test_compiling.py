"""generate(..., compile=True): the forwards through torch.compile give the tokens of eager
decoding, for both families, and the compiled model is kept for the next call."""

import pytest
import torch

import kvlib
from kvlib.compiling import _COMPILED

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_compiled_decoding_gives_the_tokens_of_eager_decoding(make_model, make_llama, preset):
    model = (make_model if preset == "tiny" else make_llama)(preset, seed=0)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9),
                        generator=torch.Generator().manual_seed(0))
    eager = kvlib.generate(model, ids, 10, cache="prealloc")
    first = kvlib.generate(model, ids, 10, cache="prealloc", compile=True)
    assert torch.equal(first.tokens, eager.tokens)
    kept = _COMPILED[model]
    again = kvlib.generate(model, ids[:, :5], 14, cache="prealloc", compile=True)
    assert _COMPILED[model] is kept  # one compiled model per model
    assert torch.equal(again.tokens, kvlib.generate(model, ids[:, :5], 14,
                                                    cache="prealloc").tokens)
    assert model.caches[0].get_seq_length() == 5 + 14 - 1  # the model's own caches were used


def test_compile_refuses_what_it_does_not_compile(tiny):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="keep their shape.*prealloc"):
        kvlib.generate(tiny, ids, 4, cache="concat", compile=True)
    with pytest.raises(ValueError, match="plain decoding"):
        kvlib.generate(tiny, ids, 4, cache="prealloc", draft="lookup", compile=True)


def test_one_graph_serves_every_decode_step(make_llama):
    """The caches' counters are symbolic: after the first decode steps no step compiles again
    (with the counters baked in as constants, every step would compile a graph of its own)."""
    from torch._dynamo.utils import counters

    from kvlib.compiling import compiled_decoding
    from kvlib.generate import generate_stream

    model = make_llama("tiny-llama", seed=1)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with compiled_decoding(model, "prealloc") as fast:
        steps = generate_stream(fast, ids, 16, cache="prealloc")
        for _ in range(3):  # the prefill and the first decode steps compile
            next(steps)
        graphs = counters["stats"]["unique_graphs"]
        tokens = [step.tokens for step in steps]
    assert len(tokens) == 13
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("cache, options", [("sinks", {"window": 12, "n_sink": 2}),
                                            ("recompute", {"window": 12})])
def test_compiled_streaming_gives_the_tokens_of_eager_streaming(make_llama, cache, options):
    """Far past the trained positions (RoPE's angles computed past the table) and the cache's
    capacity (the sink cache's ring wraps, its sinks move): the same tokens compiled."""
    model = make_llama("tiny-llama", seed=2, context_length=32)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    eager = kvlib.generate(model, ids, 75, cache=cache, **options)
    compiled = kvlib.generate(model, ids, 75, cache=cache, compile=True, **options)
    assert torch.equal(compiled.tokens, eager.tokens)


def test_new_batches_and_lengths_reuse_the_compiled_graphs(make_llama):
    """A prompt length, a batch or a number of new tokens not seen before turns that dim
    symbolic once; after that no call compiles again, and each gives eager's tokens (a
    prefill that split its graph, on the ids check or on a symbolic ``is_causal``, compiled its
    pieces again and again until dynamo gave up and ran them eagerly). Dynamo starts afresh:
    the graphs of the tests before, for the same ``forward``, would otherwise take part."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = make_llama("tiny-llama", seed=3)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=g)
    calls = [(1, 9, 6), (1, 13, 8), (2, 9, 7), (3, 17, 5), (1, 5, 12), (2, 31, 4), (3, 6, 9)]
    for k, (b, t, n) in enumerate(calls):
        if k == 3:
            graphs = counters["stats"]["unique_graphs"]
        compiled = kvlib.generate(model, ids[:b, :t], n, cache="prealloc", compile=True)
        assert torch.equal(compiled.tokens,
                           kvlib.generate(model, ids[:b, :t], n, cache="prealloc").tokens)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_function_keeps_more_graphs_than_dynamos_default():
    """Under ``compiling()`` a function compiles a graph for each of ten kinds of input, past
    dynamo's default of 8, after which it would run eagerly: a model's forward meets a graph per
    strategy, per phase of a cache and per model (the streaming benchmark needed more than 8)."""
    from torch._dynamo.utils import counters

    from kvlib.compiling import RECOMPILE_LIMIT, compiling

    assert RECOMPILE_LIMIT > 10
    double = torch.compile(lambda x: x * 2, backend="eager")  # traced by dynamo, no codegen
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.complex64]
    with compiling():
        before = counters["stats"]["unique_graphs"]
        for dtype in dtypes:
            assert torch.equal(double(torch.ones(3, dtype=dtype)),
                               torch.full((3,), 2, dtype=dtype))
        assert counters["stats"]["unique_graphs"] - before == len(dtypes)
