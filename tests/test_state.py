"""kvlib.state: a model lent out with ``preserved_state`` comes back as it was lent."""

import copy

import pytest
import torch

import kvlib
from kvlib.state import preserved_state


def test_caches_position_flags_dtype_come_back(reader_model, left_as_found):
    check = left_as_found(reader_model)
    theirs = reader_model.caches
    with preserved_state(reader_model) as model:
        model.set_kv_cache("prealloc", max_len=32)
        kvlib.generate(model, torch.tensor([[1, 2, 3]]), 4, cache="concat")
        model.to(torch.bfloat16)
        model.eval()
        model.h[0].train()
        assert all(a is not b for a, b in zip(model.caches, theirs, strict=True))
        assert model.pos != 0 and next(model.parameters()).dtype == torch.bfloat16
    check()
    assert reader_model.training and next(reader_model.parameters()).dtype == torch.float32


def test_an_error_inside_still_hands_the_model_back(reader_model, left_as_found):
    check = left_as_found(reader_model)
    with pytest.raises(RuntimeError, match="on purpose"), preserved_state(reader_model):
        reader_model.set_kv_cache("concat")
        kvlib.prefill(reader_model, torch.tensor([[1, 2, 3]]))  # the position moves on
        raise RuntimeError("on purpose")
    check()


def test_the_reader_continues_where_they_left_off(reader_model):
    """The bug this fixes: a later cell that decodes on from the reader's cache must see the
    tokens the reader put there, whatever ran in between."""
    untouched = copy.deepcopy(reader_model)
    with preserved_state(reader_model):
        kvlib.generate(reader_model, torch.tensor([[5, 6, 7, 8]]), 3, cache="prealloc")
    nxt = torch.tensor([[42]])
    with torch.inference_mode():
        got = reader_model(nxt, use_cache=True)
        want = untouched(nxt, use_cache=True)
    torch.testing.assert_close(got, want)
    assert reader_model.pos == untouched.pos

