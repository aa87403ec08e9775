"""What every model shares (kvlib.models.base): choosing a cache strategy, and its checks."""

import pytest
import torch

import kvlib

P = torch.tensor([[1, 2, 3]])


@pytest.mark.parametrize("window", [0, -3])
def test_window_not_positive(tiny, window):
    with pytest.raises(ValueError, match="window must be between 1 and the context length"):
        kvlib.generate(tiny, P, 5, cache="sliding", window=window)
    with pytest.raises(ValueError, match="window must be a positive number"):
        kvlib.SlidingWindowCache(window)


def test_window_larger_than_context(tiny):
    with pytest.raises(ValueError, match=r"between 1 and the context length \(256 tokens\)"):
        kvlib.generate(tiny, P, 5, cache="sliding", window=257)


def test_sliding_needs_window_and_others_refuse_it(tiny):
    with pytest.raises(ValueError, match="needs a window"):
        kvlib.generate(tiny, P, 5, cache="sliding")
    with pytest.raises(ValueError, match="window applies to 'sliding'"):
        kvlib.generate(tiny, P, 5, cache="prealloc", window=4)
