"""Borrow a reader's model and hand it back as it was: ``with preserved_state(model): ...``.

The pictures and widgets generate text with the reader's own model, and generating gives every
attention layer a fresh cache (``set_kv_cache``). Inside the ``with`` block they may do that; on
the way out every attention layer gets back the very cache object it had (``model.using``), and
with it the position counter, which the caches own; every module gets back its training flag and
the parameters their dtype and device. The reader's caches keep their tokens because nothing
writes to them meanwhile: ``set_kv_cache`` replaces cache objects, it never resets the ones it
replaces.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .caches import KVCache
from .models import CausalLM


@dataclass
class ModelState:
    """What a borrowed model must look like again when it is handed back."""

    caches: list[KVCache]  # each attention layer's cache object (and so its position)
    training: list[tuple[nn.Module, bool]]  # every module's train/eval flag
    dtype: torch.dtype  # of the parameters
    device: torch.device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def capture_state(model: CausalLM) -> ModelState:
    """Note the model's caches, training flags, dtype and device."""
    first = next(model.parameters())
    return ModelState(list(model.caches), [(m, m.training) for m in model.modules()],
                      first.dtype, first.device)


def restore_state(model: CausalLM, state: ModelState) -> None:
    """Put back what ``capture_state`` noted (the dtype and device first, so that moving the model
    does not touch the caches put back after it)."""
    first = next(model.parameters())
    if (first.dtype, first.device) != (state.dtype, state.device):
        model.to(device=state.device, dtype=state.dtype)
    for module, training in state.training:
        module.training = training


@contextmanager
def preserved_state(model: CausalLM) -> Iterator[CausalLM]:
    """Lend ``model`` to the block and restore its caches (and so its position counter),
    training flags, dtype and device when the block ends, by an error too."""
    state = capture_state(model)
    with model.using(state.caches):  # gives every layer its own cache object back
        try:
            yield model
        finally:
            restore_state(model, state)
