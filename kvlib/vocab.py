"""GPT-2's tokenizer with a trimmed vocabulary: the models trained here use a few thousand ids.

GPT-2's BPE (tiktoken) splits the text as usual; then each GPT-2 id is mapped to a smaller
vocabulary that keeps

- the 256 single-byte GPT-2 tokens (GPT-2 ids 0..255, one per byte value),
- ``<|endoftext|>``,
- and the most frequent other GPT-2 ids of a training corpus, up to ``vocab_size`` in all.

A GPT-2 token that was not kept is written as the tokens of its bytes, so *any* text still
encodes, and decodes back exactly. The kept GPT-2 ids, in increasing order, are the vocabulary:
new id ``i`` is GPT-2 id ``gpt2_ids[i]`` (so ids 0..255 are the same bytes in both, and
``<|endoftext|>`` is the last id). Decoding maps back to GPT-2 ids and lets tiktoken decode, which
joins the bytes first, so a character split over byte tokens comes out whole.

    tok = TrimmedTokenizer.from_counts(counts, vocab_size=8192)   # counts: GPT-2 id -> count
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

    def __init__(self, gpt2_ids: Sequence[int]) -> None:
        ids = sorted({int(i) for i in gpt2_ids})
        if len(ids) != len(gpt2_ids):
            raise ValueError("gpt2_ids must not repeat an id")
        if ids[0] < 0 or ids[-1] >= GPT2_VOCAB_SIZE:
            raise ValueError(f"gpt2_ids must lie in [0, {GPT2_VOCAB_SIZE})")
        missing = sorted(set(range(N_BYTES)) - set(ids)) + ([] if EOT_ID in ids else [EOT_ID])
        if missing:
            raise ValueError(f"a trimmed vocabulary must keep the 256 byte tokens (GPT-2 ids "
                             f"0..255) and <|endoftext|> ({EOT_ID}); missing {missing[:8]}")
        self.gpt2_ids = tuple(ids)
        self.vocab_size = len(ids)
        self._to_gpt2 = np.asarray(ids, dtype=np.int64)
        self._from_gpt2 = np.full(GPT2_VOCAB_SIZE, -1, dtype=np.int64)
        self._from_gpt2[self._to_gpt2] = np.arange(len(ids))
        self.eot_id = int(self._from_gpt2[EOT_ID])
        self._spelled: dict[int, list[int]] = {}  # GPT-2 id not kept -> its bytes' new ids

    # --- building, saving ------------------------------------------------------------------

    @classmethod
    def from_counts(cls, counts: Sequence[int] | np.ndarray, vocab_size: int) -> TrimmedTokenizer:
        """Keep the bytes, ``<|endoftext|>`` and the ``vocab_size - 257`` most frequent other
        GPT-2 ids (``counts[g]``: how often GPT-2 id ``g`` occurs; ties go to the smaller id)."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (GPT2_VOCAB_SIZE,):
            raise ValueError(f"counts must have one entry per GPT-2 id ({GPT2_VOCAB_SIZE}), "
                             f"got shape {counts.shape}")
        if not N_BYTES + 1 <= vocab_size <= GPT2_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be between {N_BYTES + 1} (the bytes and "
                             f"<|endoftext|>) and {GPT2_VOCAB_SIZE}, got {vocab_size}")
        forced = [*range(N_BYTES), EOT_ID]
        rest = np.delete(np.arange(GPT2_VOCAB_SIZE), forced)
        order = rest[np.lexsort((rest, -counts[rest]))]  # by count, descending; then by id
        return cls([*forced, *order[: vocab_size - len(forced)].tolist()])

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrimmedTokenizer:
        """Read a ``vocab.json`` that ``save`` wrote."""
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            return cls(data["gpt2_ids"])
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{path}: not a kvlib vocabulary file ({e})") from e

    def save(self, path: str | os.PathLike, **info) -> None:
        """Write ``vocab.json``: the kept GPT-2 ids and ``info`` (e.g. where they come from)."""
        data = {"format": FORMAT, "base": "gpt2", "vocab_size": self.vocab_size, **info,
                "gpt2_ids": list(self.gpt2_ids)}
        Path(path).write_text(json.dumps(data) + "\n")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrimmedTokenizer) and self.gpt2_ids == other.gpt2_ids

    def __hash__(self) -> int:
        return hash(self.gpt2_ids)

    def __repr__(self) -> str:
        return f"TrimmedTokenizer(vocab_size={self.vocab_size})"

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
        if not len(missing):
            return mapped
        parts, prev = [], 0
        for i in missing.tolist():
            parts += [mapped[prev:i], np.asarray(self.spell(int(arr[i])), dtype=np.int64)]
            prev = i + 1
        parts.append(mapped[prev:])
        return np.concatenate(parts)

    def to_gpt2(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """This vocabulary's ids to GPT-2 ids (int64 array); an error for an id out of range."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got values from "
                             f"{arr.min()} to {arr.max()}")
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
