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


def make_model(preset: str = "tiny", seed: int = 0, **overrides) -> kvlib.GPTModel:
    torch.manual_seed(seed)
    return kvlib.GPTModel(kvlib.GPTConfig.from_preset(preset, **overrides)).eval()


def make_llama(preset: str = "tiny-llama", seed: int = 0, **overrides) -> kvlib.LlamaModel:
    torch.manual_seed(seed)
    return kvlib.LlamaModel(kvlib.LlamaConfig.from_preset(preset, **overrides)).eval()


@pytest.fixture(scope="session")
def tiny() -> kvlib.GPTModel:
    return make_model("tiny")


@pytest.fixture(scope="session")
def gpt2() -> kvlib.GPTModel:
    return make_model("gpt2", seed=123)


@pytest.fixture(scope="module")
def one_thread():
    """Models this small run fastest on one thread; two threads on a busy 2-core machine can be
    100x slower (OpenMP workers waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
