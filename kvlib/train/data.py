"""The tokens a run trains and is scored on: the corpus, its trimmed vocabulary, the batches.

The vocabulary is counted on the train split only. Batches are windows of ``seq_len + 1`` tokens
(inputs and the next tokens) cut from the train stream without overlap; every epoch visits them
all in an order drawn from ``seed`` and the epoch number alone, so the batch of step ``s`` is a
function of ``s``: a resumed run needs nothing but the step to continue the data exactly.

Two options change the windows (``TrainConfig.bos`` and ``recall_share``). With a start token
(``bos_id``, the vocabulary's ``<|endoftext|>``) every window opens with it, as real pretraining
starts every sequence, then ``seq_len`` tokens of the stream, so the stream still advances by
``seq_len`` a window. With ``share`` > 0 each epoch also holds passkey episodes
(``kvlib.passkey``: a value bound at a random place and asserted up to a window later, in code of
the train split), ``share`` of its rows, shuffled in with the windows; episode ``e`` of epoch
``n`` is drawn from ``seed``, ``n`` and ``e`` alone, so the batches stay a function of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..corpus import SPLITS, Corpus
from ..passkey import Passkeys
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


def fixed_windows(ids: np.ndarray, n: int, length: int, bos_id: int | None = None) -> Tensor:
    """``n`` windows of ``length`` tokens spread evenly over ``ids`` (first and last included):
    the fixed slices that validation and the held-out score read. With ``bos_id`` each window
    is that token and then ``length - 1`` of ``ids``, as the training windows start."""
    span = length - (bos_id is not None)
    if len(ids) < span:
        raise ValueError(f"a split of {len(ids)} tokens is shorter than one window ({span})")
    starts = np.linspace(0, len(ids) - span, n).astype(np.int64)
    rows = np.stack([ids[s : s + span] for s in starts]).astype(np.int64)
    if bos_id is not None:
        rows = np.concatenate([np.full((n, 1), bos_id, dtype=np.int64), rows], axis=1)
    return torch.from_numpy(rows)


def consecutive_windows(ids: np.ndarray, length: int, bos_id: int | None = None) -> Tensor:
    """All of ``ids`` cut into windows of ``length`` tokens, one after the other (the tail that
    makes no whole window left out), each opening with ``bos_id`` if given."""
    span = length - (bos_id is not None)
    rows = torch.from_numpy(ids[: len(ids) // span * span].astype(np.int64)).view(-1, span)
    if bos_id is not None:
        rows = torch.cat([torch.full((rows.shape[0], 1), bos_id), rows], dim=1)
    return rows


class Batches:
    """``batches(step)`` -> inputs and targets ``(batch_size, seq_len)``, from ``seed`` and
    ``step`` alone (see the module docstring). ``bos_id``: every window starts with it;
    ``share``: that share of each epoch's rows are episodes of ``passkeys``."""

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 bos_id: int | None = None, passkeys: Passkeys | None = None,
                 share: float = 0.0) -> None:
        self.bos_id = bos_id
        self.n_windows = (len(ids) - (bos_id is None)) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{len(ids)} training tokens make no window of {seq_len + 1}")
        if not 0 <= share < 1:
            raise ValueError(f"the share of passkey episodes must be in [0, 1), got {share}")
        if share and passkeys is None:
            raise ValueError("passkey episodes need a kvlib.passkey.Passkeys (the tokenizer's)")
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.n_episodes = round(self.n_windows * share / (1 - share))  # per epoch
        self.passkeys = passkeys
        self.code = passkeys.code(ids) if self.n_episodes else None
        self._order: tuple[int, Tensor] | None = None  # (epoch, its permutation)

    @property
    def n_rows(self) -> int:
        """Rows in an epoch: every window once, and the episodes."""
        return self.n_windows + self.n_episodes

    def order(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n_rows, generator=g))
        return self._order[1]

    def source(self, i: int) -> tuple[str, int, int]:
        """What row ``i`` of the run is: ``("window", epoch, k)``, the stream's ``k``-th window,
        or ``("episode", epoch, e)``."""
        epoch, k = divmod(i, self.n_rows)
        j = int(self.order(epoch)[k])
        if j < self.n_windows:
            return "window", epoch, j
        return "episode", epoch, j - self.n_windows

    def row(self, i: int) -> Tensor:
        """Row ``i`` of the run: ``seq_len + 1`` tokens."""
        kind, epoch, j = self.source(i)
        if kind == "episode":
            rng = np.random.default_rng([self.seed, epoch, j])
            episode = self.passkeys.training_row(self.code, rng, self.seq_len + 1,
                                                 self.bos_id is not None)
            return torch.from_numpy(episode.ids)
        start = j * self.seq_len
        if self.bos_id is None:
            return self.ids[start : start + self.seq_len + 1]
        return torch.cat([self.ids.new_tensor([self.bos_id]),
                          self.ids[start : start + self.seq_len]])

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        batch = torch.stack([self.row(i) for i in range(step * self.batch_size,
                                                          (step + 1) * self.batch_size)])
        return batch[:, :-1], batch[:, 1:]

    def epoch_of(self, step: int) -> float:
        """How many passes over the train split (and its episodes) ``step`` steps make."""
        return step * self.batch_size / self.n_rows
