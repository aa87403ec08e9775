"""GPT-2's tokenizer with a trimmed vocabulary: the models trained here use a few thousand ids.

GPT-2's BPE (tiktoken) splits the text as usual; then each GPT-2 id is mapped to a smaller
vocabulary that keeps

- the 256 single-byte GPT-2 tokens (GPT-2 ids 0..255, one per byte value),
- ``<|endoftext|>``,
- the most frequent other GPT-2 ids of a training corpus,
- and, with ``max_space_run=M``, one token for each run of 2..M spaces (GPT-2's BPE has no
  token for two spaces, so four spaces of indentation cost four tokens; OpenAI's later
  ``p50k_base`` added such runs to GPT-2's ranks for code in the same way),

up to ``vocab_size`` ids in all.

A GPT-2 token that was not kept is written as the tokens of its bytes, so *any* text still
encodes, and decodes back exactly. The kept GPT-2 ids, in increasing order, are the vocabulary:
new id ``i`` is GPT-2 id ``gpt2_ids[i]`` (so ids 0..255 are the same bytes in both, and
``<|endoftext|>`` is the last of them). The space runs come after: id ``len(gpt2_ids) + k`` is
``k + 2`` spaces. Encoding splits with GPT-2's BPE, maps the ids, then merges each run of GPT-2's
single-space token (id 220) greedily into runs of at most M. Decoding expands the runs, maps
back to GPT-2 ids and lets tiktoken decode, which joins the bytes first, so a character split
over byte tokens comes out whole.

    tok = TrimmedTokenizer.from_counts(counts, vocab_size=8192, max_space_run=24)
    tok.save("vocab.json"); TrimmedTokenizer.load("vocab.json") == tok
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .tokenizer import EOT_ID, GPT2_VOCAB_SIZE, decode, get_tokenizer

FORMAT = "kvlib trimmed GPT-2 vocabulary"
N_BYTES = 256  # GPT-2 ids 0..255 are the 256 single bytes
SPACE_ID = 220  # GPT-2's " ", a byte token: every space of indentation costs one


def is_vocab_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a vocabulary that ``TrimmedTokenizer.save`` wrote (read from its first
    bytes: Hugging Face's GPT-2 folders hold a ``vocab.json`` of another kind)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return FORMAT.encode() in f.read(200)


class TrimmedTokenizer:
    """GPT-2's BPE over a subset of its ids (see the module docstring). ``encode`` / ``decode``
    / ``vocab_size`` / ``eot_id`` as every kvlib tokenizer; ``from_gpt2`` / ``to_gpt2`` map ids."""

    name = "gpt2-trimmed"

    def __init__(self, gpt2_ids: Sequence[int], max_space_run: int = 0) -> None:
        ids = sorted({int(i) for i in gpt2_ids})
        if len(ids) != len(gpt2_ids):
            raise ValueError("gpt2_ids must not repeat an id")
        if ids[0] < 0 or ids[-1] >= GPT2_VOCAB_SIZE:
            raise ValueError(f"gpt2_ids must lie in [0, {GPT2_VOCAB_SIZE})")
        missing = sorted(set(range(N_BYTES)) - set(ids)) + ([] if EOT_ID in ids else [EOT_ID])
        if missing:
            raise ValueError(f"a trimmed vocabulary must keep the 256 byte tokens (GPT-2 ids "
                             f"0..255) and <|endoftext|> ({EOT_ID}); missing {missing[:8]}")
        if max_space_run == 1 or max_space_run < 0:
            raise ValueError(f"max_space_run is 0 (no space runs) or at least 2, got "
                             f"{max_space_run}")
        self.gpt2_ids = tuple(ids)
        self.max_space_run = int(max_space_run)
        self.n_gpt2 = len(ids)
        self.vocab_size = len(ids) + max(self.max_space_run - 1, 0)
        self._to_gpt2 = np.asarray(ids, dtype=np.int64)
        self._from_gpt2 = np.full(GPT2_VOCAB_SIZE, -1, dtype=np.int64)
        self._from_gpt2[self._to_gpt2] = np.arange(len(ids))
        self.eot_id = int(self._from_gpt2[EOT_ID])
        self._spelled: dict[int, list[int]] = {}  # GPT-2 id not kept -> its bytes' new ids
        self.space_id = int(self._from_gpt2[SPACE_ID])
        # new id -> how many GPT-2 ids it stands for (1, or the length of a space run)
        self._width = np.ones(self.vocab_size, dtype=np.int64)
        self._width[self.n_gpt2 :] = np.arange(2, self.max_space_run + 1)

    # --- building, saving ------------------------------------------------------------------

    @classmethod
    def from_counts(cls, counts: Sequence[int] | np.ndarray, vocab_size: int,
                    max_space_run: int = 0) -> TrimmedTokenizer:
        """Keep the bytes, ``<|endoftext|>``, the runs of 2..``max_space_run`` spaces and, up to
        ``vocab_size`` ids in all, the most frequent other GPT-2 ids (``counts[g]``: how often
        GPT-2 id ``g`` occurs; ties go to the smaller id)."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (GPT2_VOCAB_SIZE,):
            raise ValueError(f"counts must have one entry per GPT-2 id ({GPT2_VOCAB_SIZE}), "
                             f"got shape {counts.shape}")
        runs = max(max_space_run - 1, 0)
        if not N_BYTES + 1 + runs <= vocab_size <= GPT2_VOCAB_SIZE + runs:
            raise ValueError(f"vocab_size must be between {N_BYTES + 1 + runs} (the bytes, "
                             f"<|endoftext|> and {runs} space runs) and "
                             f"{GPT2_VOCAB_SIZE + runs}, got {vocab_size}")
        forced = [*range(N_BYTES), EOT_ID]
        rest = np.delete(np.arange(GPT2_VOCAB_SIZE), forced)
        order = rest[np.lexsort((rest, -counts[rest]))]  # by count, descending; then by id
        return cls([*forced, *order[: vocab_size - runs - len(forced)].tolist()], max_space_run)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrimmedTokenizer:
        """Read a ``vocab.json`` that ``save`` wrote."""
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            return cls(data["gpt2_ids"], data.get("max_space_run", 0))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{path}: not a kvlib vocabulary file ({e})") from e

    def save(self, path: str | os.PathLike, **info) -> None:
        """Write ``vocab.json``: the kept GPT-2 ids and ``info`` (e.g. where they come from)."""
        data = {"format": FORMAT, "base": "gpt2", "vocab_size": self.vocab_size,
                "max_space_run": self.max_space_run, **info, "gpt2_ids": list(self.gpt2_ids)}
        Path(path).write_text(json.dumps(data) + "\n")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TrimmedTokenizer) and self.gpt2_ids == other.gpt2_ids
                and self.max_space_run == other.max_space_run)

    def __hash__(self) -> int:
        return hash((self.gpt2_ids, self.max_space_run))

    def __repr__(self) -> str:
        runs = f", max_space_run={self.max_space_run}" if self.max_space_run else ""
        return f"TrimmedTokenizer(vocab_size={self.vocab_size}{runs})"

    # --- ids ---------------------------------------------------------------------------------

    def spell(self, gpt2_id: int) -> list[int]:
        """The new ids of GPT-2 id ``gpt2_id``: itself if kept, else one byte token per byte."""
        new = int(self._from_gpt2[gpt2_id])
        if new >= 0:
            return [new]
        if gpt2_id not in self._spelled:
            enc = get_tokenizer()
            raw = enc.decode_single_token_bytes(gpt2_id)
            self._spelled[gpt2_id] = [int(self._from_gpt2[enc.encode_single_token(bytes([b]))])
                                      for b in raw]
        return self._spelled[gpt2_id]

    def kept(self, gpt2_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Whether each GPT-2 id is in this vocabulary (a boolean array)."""
        return self._from_gpt2[np.asarray(gpt2_ids, dtype=np.int64)] >= 0

    def from_gpt2(self, gpt2_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """GPT-2 ids to this vocabulary's ids (int64 array; longer where a token is spelled)."""
        arr = np.asarray(gpt2_ids, dtype=np.int64).reshape(-1)
        mapped = self._from_gpt2[arr]
        missing = np.flatnonzero(mapped < 0)
        if len(missing):
            parts, prev = [], 0
            for i in missing.tolist():
                parts += [mapped[prev:i], np.asarray(self.spell(int(arr[i])), dtype=np.int64)]
                prev = i + 1
            parts.append(mapped[prev:])
            mapped = np.concatenate(parts)
        return self._merge_spaces(mapped) if self.max_space_run else mapped

    def _merge_spaces(self, ids: np.ndarray) -> np.ndarray:
        """Each run of single spaces as tokens of ``max_space_run`` spaces, then one of the
        rest (a lone space stays the byte token)."""
        is_space = np.concatenate([[False], ids == self.space_id, [False]])
        edges = np.flatnonzero(is_space[1:] != is_space[:-1])
        starts, ends = edges[0::2], edges[1::2]
        long = (ends - starts) >= 2
        if not long.any():
            return ids
        parts, prev, m = [], 0, self.max_space_run
        for start, end in zip(starts[long].tolist(), ends[long].tolist(), strict=True):
            full, rest = divmod(end - start, m)
            run = [self.n_gpt2 + m - 2] * full
            run += [self.space_id] if rest == 1 else [self.n_gpt2 + rest - 2] if rest else []
            parts += [ids[prev:start], np.asarray(run, dtype=np.int64)]
            prev = end
        parts.append(ids[prev:])
        return np.concatenate(parts)

    def to_gpt2(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """This vocabulary's ids to GPT-2 ids (int64 array); an error for an id out of range."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got values from "
                             f"{arr.min()} to {arr.max()}")
        if not self.max_space_run:
            return self._to_gpt2[arr]
        arr = np.repeat(arr, self._width[arr])
        arr[arr >= self.n_gpt2] = self.space_id  # a run's copies are single spaces
        return self._to_gpt2[arr]

    # --- text --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` (``<|endoftext|>`` is allowed, as in ``kvlib.encode``)."""
        enc = get_tokenizer()
        return self.from_gpt2(enc.encode(text, allowed_special={"<|endoftext|>"})).tolist()

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids for ``text``, reading ``<|endoftext|>`` in it as plain characters."""
        return self.from_gpt2(get_tokenizer().encode_ordinary(text)).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """Text for token ids (any tensor, array or list of ints)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return decode(self.to_gpt2(ids).tolist())
