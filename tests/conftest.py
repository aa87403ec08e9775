import os
from pathlib import Path

import pytest
import torch

import kvlib

# Offline machines: use the tiktoken files beside the checkout when they are there.
_shared = Path(__file__).resolve().parents[1].parent / "shared" / "tiktoken-cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _shared.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_shared)

torch.set_num_threads(min(2, torch.get_num_threads()))


def _make_model(preset: str = "tiny", seed: int = 0, **overrides) -> kvlib.GPTModel:
    torch.manual_seed(seed)
    return kvlib.GPTModel(kvlib.GPTConfig.from_preset(preset, **overrides)).eval()


def _make_llama(preset: str = "tiny-llama", seed: int = 0, **overrides) -> kvlib.LlamaModel:
    torch.manual_seed(seed)
    return kvlib.LlamaModel(kvlib.LlamaConfig.from_preset(preset, **overrides)).eval()


@pytest.fixture(scope="session")
def make_llama():
    """A factory: ``make_llama(preset="tiny-llama", seed=0, **config_overrides)``, a fresh
    Llama-family model in eval mode."""
    return _make_llama


@pytest.fixture(scope="session")
def make_model():
    """A factory: ``make_model(preset="tiny", seed=0, **config_overrides)``, a fresh GPT-2-family
    model in eval mode, for tests that change the model they get."""
    return _make_model


@pytest.fixture(scope="session")
def tiny() -> kvlib.GPTModel:
    return _make_model("tiny")


@pytest.fixture(scope="session")
def gpt2() -> kvlib.GPTModel:
    return _make_model("gpt2", seed=123)


@pytest.fixture(scope="module")
def one_thread():
    """Models this small run fastest on one thread; two threads on a busy 2-core machine can be
    100x slower (OpenMP workers waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prompt() -> str:
    """The prompt the pictures' tests generate from (5 tokens)."""
    return "The cache keeps the keys"


@pytest.fixture
def reader_model() -> kvlib.GPTModel:
    """A fresh tiny model as a reader leaves it between two cells: sliding caches that hold the
    reader's tokens (the ring has wrapped), the position counter past them, in training mode."""
    model = _make_model("tiny")
    kvlib.generate(model, torch.tensor([kvlib.encode("The reader's own text")]), 6,
                   cache="sliding", window=4)
    model.train()
    return model


def _same_bytes(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture(scope="session")
def left_as_found():
    """``check = left_as_found(model)`` before lending the model out, ``check()`` after: every
    layer holds the same cache object (``is``) with the same tokens and bytes, and the position
    counter, training flags, dtype and device are what they were."""

    def note(model: kvlib.CausalLM):
        caches = list(model.caches)
        lengths = [c.get_seq_length() for c in caches]
        buffers = [{n: b.clone() for n, b in c.named_buffers()} for c in caches]
        pos, training = model.pos, [m.training for m in model.modules()]
        first = next(model.parameters())
        dtype, device = first.dtype, first.device

        def check() -> None:
            assert all(now is then for now, then in zip(model.caches, caches, strict=True))
            assert [c.get_seq_length() for c in model.caches] == lengths
            for cache, held in zip(model.caches, buffers, strict=True):
                now = dict(cache.named_buffers())
                assert now.keys() == held.keys()
                assert all(_same_bytes(now[n], held[n]) for n in held)
            assert model.pos == pos
            assert [m.training for m in model.modules()] == training
            first = next(model.parameters())
            assert (first.dtype, first.device) == (dtype, device)

        return check

    return note
