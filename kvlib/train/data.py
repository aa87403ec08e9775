"""The tokens a run trains and is scored on: the corpus, its trimmed vocabulary, the batches.

The vocabulary is counted on the train split only. Batches are windows of ``seq_len + 1`` tokens
(inputs and the next tokens) cut from the train stream without overlap; every epoch visits them
all in an order drawn from ``seed`` and the epoch number alone, so the batch of step ``s`` is a
function of ``s``: a resumed run needs nothing but the step to continue the data exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..corpus import SPLITS, Corpus
from ..tokenizer import GPT2_VOCAB_SIZE
from ..vocab import SPACE_ID, TrimmedTokenizer

# Runs of 2..24 spaces get a token each, as in OpenAI's p50k_base: with GPT-2's BPE alone 39% of
# the stdlib's tokens are single spaces of indentation, and a small model learns to write runs
# of spaces rather than code.
MAX_SPACE_RUN = 24


@dataclass
class TokenData:
    """The corpus as ids of its trimmed vocabulary, per split, and what it is made of."""

    tokenizer: TrimmedTokenizer
    ids: dict[str, np.ndarray]  # split -> int32 stream, files separated by <|endoftext|>
    manifest: dict  # Corpus.manifest() plus the token counts


def build_data(vocab_size: int, root: str | None = None,
               max_space_run: int = MAX_SPACE_RUN) -> TokenData:
    """Read the corpus, count GPT-2's ids on the train split, keep the ``vocab_size`` most
    useful (``TrimmedTokenizer.from_counts``, with the space runs) and map every split."""
    corpus = Corpus.build(root)
    gpt2 = {s: corpus.gpt2_tokens(s) for s in SPLITS}
    if not all(len(corpus.files[s]) for s in SPLITS):
        raise ValueError(f"{corpus.root}: every split needs files, got "
                         f"{ {s: len(corpus.files[s]) for s in SPLITS} }")
    tokenizer = TrimmedTokenizer.from_counts(np.bincount(gpt2["train"], minlength=GPT2_VOCAB_SIZE),
                                             vocab_size, max_space_run)
    ids = {s: tokenizer.from_gpt2(gpt2[s]).astype(np.int32) for s in SPLITS}
    manifest = corpus.manifest()
    for s in SPLITS:
        manifest["splits"][s].update(gpt2_tokens=len(gpt2[s]), tokens=len(ids[s]))
    test = gpt2["test"]
    manifest["test_space_share_gpt2"] = float((test == SPACE_ID).mean())  # with GPT-2's BPE
    manifest["test_space_share"] = float((ids["test"] == tokenizer.space_id).mean())
    manifest["max_space_run"] = tokenizer.max_space_run
    manifest["test_files"] = [str(f) for f in corpus.files["test"]]
    manifest["test_spelled_share"] = float(1 - tokenizer.kept(test).mean())  # not in the vocab
    return TokenData(tokenizer, ids, manifest)


def fixed_windows(ids: np.ndarray, n: int, length: int) -> Tensor:
    """``n`` windows of ``length`` tokens spread evenly over ``ids`` (first and last included):
    the fixed slices that validation and the held-out score read."""
    if len(ids) < length:
        raise ValueError(f"a split of {len(ids)} tokens is shorter than one window ({length})")
    starts = np.linspace(0, len(ids) - length, n).astype(np.int64)
    return torch.from_numpy(np.stack([ids[s : s + length] for s in starts]).astype(np.int64))


class Batches:
    """``batches(step)`` -> inputs and targets ``(batch_size, seq_len)``, from ``seed`` and
    ``step`` alone (see the module docstring)."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        self.n_windows = (len(ids) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{len(ids)} training tokens make no window of {seq_len + 1}")
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self._order: tuple[int, Tensor] | None = None  # (epoch, its permutation)

    def order(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n_windows, generator=g))
        return self._order[1]

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        rows = []
        for i in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, k = divmod(i, self.n_windows)
            start = int(self.order(epoch)[k]) * self.seq_len
            rows.append(self.ids[start : start + self.seq_len + 1])
        batch = torch.stack(rows)
        return batch[:, :-1], batch[:, 1:]

    def epoch_of(self, step: int) -> float:
        """How many passes over the train split ``step`` steps make."""
        return step * self.batch_size / self.n_windows
