"""Measure what a cache holds at every generation step, read from the real caches.

``cache_frames`` generates greedily with one strategy and records one layer's cache after each
step: the position every slot holds (``slot_positions()``), the slots the step wrote (found by
comparing the key buffer's bytes before and after), the bytes held. It borrows the reader's model
and hands it back as it was (``kvlib.state.preserved_state``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..caches import strategy as strategy_class
from ..generate import Step, generate_stream
from ..models import CausalLM
from ..state import model_device, preserved_state
from ..style import strategy_label
from .inputs import Prompt, StrategySpec, prompt_ids, split_spec


@dataclass
class CacheFrame:
    """One layer's cache right after one generation step, as read from the cache itself."""

    step: int  # generate_stream's Step.index: 0 is the prefill
    layer: int
    strategy: str
    window: int | None
    positions: list[int]  # the position each slot of the buffer holds; -1: allocated, empty
    written: list[int]  # slots whose keys changed during this step (compared bit for bit)
    writes: list[int]  # how often each slot has been written so far (> 1: overwritten)
    evicted: list[int]  # positions whose slot was overwritten during this step
    capacity: int | None  # slots the cache can hold (None: grows without bound)
    cache_tokens: int  # cache.get_seq_length(): tokens given to the cache since the reset
    layer_nbytes: int  # bytes held by this layer's cache
    nbytes: int  # bytes held by the caches of all layers (model.kv_cache_nbytes)
    seconds: float  # wall time of the step (generate_stream's Stopwatch)
    tokens: list[int] = field(default_factory=list)  # the sequence after this step

    @property
    def filled(self) -> int:
        return sum(p >= 0 for p in self.positions)


def changed_slots(keys_before: Tensor, keys_after: Tensor | None) -> list[int]:
    """Slots of a (B, H, S, D) buffer whose bytes differ between two snapshots (new ones too)."""
    if keys_after is None:
        return []
    common = min(keys_before.shape[2], keys_after.shape[2])
    a = keys_before[:, :, :common].contiguous().view(torch.uint8)  # bytes: NaN-safe comparison
    b = keys_after[:, :, :common].contiguous().view(torch.uint8)
    changed = (a != b).any(dim=3).any(dim=1).any(dim=0)  # (S,)
    return [int(s) for s in changed.nonzero()[:, 0]] + list(range(common, keys_after.shape[2]))


class _SlotHistory:
    """What one layer's cache looked like after the previous step, to tell what a step changed."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None  # the key buffer after the previous step (a copy)
        self.positions: list[int] = []  # the position each slot held after the previous step
        self.writes: list[int] = []  # how often each slot has been written so far

    def written(self, positions: list[int], keys: Tensor | None) -> list[int]:
        """The slots this step wrote. A fresh buffer's written slots are its filled ones."""
        if self.keys is None:
            return [s for s, p in enumerate(positions) if p >= 0]
        return changed_slots(self.keys, keys)

    def evicted(self, written: list[int]) -> list[int]:
        """The positions that the written slots held before this step."""
        old = self.positions
        return [old[s] for s in written if s < len(old) and old[s] >= 0]

    def count_writes(self, positions: list[int], written: list[int]) -> list[int]:
        self.writes += [0] * (len(positions) - len(self.writes))
        for s in written:
            self.writes[s] += 1
        return list(self.writes)

    def remember(self, positions: list[int], keys: Tensor | None) -> None:
        self.keys = None if keys is None else keys.clone()
        self.positions = positions


def _record_frames(model: CausalLM, prompt: Tensor, steps: Iterable[Step],
                   layer: int) -> list[CacheFrame]:
    """Read layer ``layer``'s cache after each of ``steps`` (a running ``generate_stream``)."""
    frames, history = [], _SlotHistory()
    tokens = prompt[0].tolist()
    for step in steps:
        cache = model.caches[layer]
        if not isinstance(getattr(cache, "keys", None), Tensor):
            raise ValueError(f"the explorer reads a cache's key buffer slot by slot, and the "
                             f"{cache.name!r} cache keeps its keys otherwise (quantized, or in "
                             "blocks): choose one that stores them as they are, such as 'concat'")
        positions = cache.slot_positions()
        written = history.written(positions, cache.keys)
        tokens.append(int(step.tokens[0]))
        frames.append(CacheFrame(
            step.index, layer, cache.name, cache.window, positions, written,
            history.count_writes(positions, written), history.evicted(written), cache.capacity,
            cache.get_seq_length(), cache.nbytes, step.cache_nbytes, step.seconds, list(tokens)))
        history.remember(positions, cache.keys)
    return frames


def cache_frames(model: CausalLM, prompt: Prompt, max_new_tokens: int, strategy: str = "concat",
                 window: int | None = None, layer: int = 0) -> list[CacheFrame]:
    """Generate greedily with one cache strategy and record layer ``layer``'s cache after every
    step: which position each slot holds, which slots the step wrote (found by comparing the key
    buffer before and after), how many bytes the caches hold. The model is handed back with its
    own caches, position counter, training flags, dtype and device."""
    if not strategy_class(strategy).traits.keeps_tokens:
        raise ValueError(f"the explorer shows a cache, and {strategy!r} keeps no tokens: choose "
                         "one that does, such as 'concat', 'prealloc' or 'sliding'")
    ids = prompt_ids(prompt, model_device(model))
    with preserved_state(model):
        steps = generate_stream(model, ids, max_new_tokens, cache=strategy, window=window)
        return _record_frames(model, ids, steps, layer)


def cache_frames_for(model: CausalLM, prompt: Prompt, max_new_tokens: int,
                     strategies: Sequence[StrategySpec] = ("concat", "prealloc", ("sliding", 8)),
                     layer: int = 0) -> dict[str, list[CacheFrame]]:
    """``cache_frames`` for several strategies, keyed by ``strategy_label``."""
    runs = {}
    for spec in strategies:
        strategy, window = split_spec(spec)
        runs[strategy_label(strategy, window)] = cache_frames(model, prompt, max_new_tokens,
                                                              strategy, window, layer)
    return runs
