"""The corpus the models trained here learn from: the Python standard library's own source code.

Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` of the Python that runs the script,
in sorted order, except

- ``site-packages`` (and ``dist-packages``): third-party code, different on every machine;
- test directories (``test``, ``tests``, ``idle_test``): CPython's regression tests are more than
  half of the files and of the bytes (3.11: 59% and 62%), full of deliberately odd data (bad
  encodings, invalid syntax, huge literal tables); the library itself is the code worth
  imitating, and a 30-minute run on two cores reads about as many tokens as the library alone
  holds;
- build-specific files (``_sysconfigdata_*.py``, ``config-*`` directories): they hold this
  machine's compiler flags and paths, so they would make the corpus differ between machines.

Licence: the Python standard library is distributed under the PSF License Agreement (the
``LICENSE.txt`` beside it), which permits copying and derivative works with the notice kept.

The split is by file and needs no randomness: a file's split is decided by the SHA-256 of its
path relative to the stdlib root (``split_of``): 5% of the files are the held-out ``test`` split,
2.5% ``valid``, the rest ``train``. A file never straddles two splits, and the same path lands in
the same split on every machine and Python version. ``Corpus.build().manifest()`` records the
Python version, the file and character counts, and a fingerprint of the contents, so anyone can
check that a rebuild read the same text.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenizer import EOT_ID, get_tokenizer

SPLITS = ("train", "valid", "test")
TEST_PER_MILLE, VALID_PER_MILLE = 50, 25  # 5% and 2.5% of the files
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})
LICENCE = "PSF License Agreement (the Python standard library's own licence)"


def stdlib_root() -> Path:
    """The standard library of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """``"test"``, ``"valid"`` or ``"train"`` for a file's path relative to the stdlib root
    (POSIX separators): the first 8 bytes of its SHA-256, modulo 1000, against the shares."""
    bucket = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") % 1000
    if bucket < TEST_PER_MILLE:
        return "test"
    return "valid" if bucket < TEST_PER_MILLE + VALID_PER_MILLE else "train"


def included(relpath: str) -> bool:
    """Whether a ``.py`` file (path relative to the root) belongs to the corpus."""
    *dirs, name = relpath.split("/")
    if EXCLUDED_DIRS.intersection(dirs) or any(d.startswith("config-") for d in dirs):
        return False
    return name.endswith(".py") and not name.startswith("_sysconfigdata")


def list_files(root: str | Path | None = None) -> list[str]:
    """The corpus files under ``root`` (default: this Python's stdlib), relative, sorted."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (the standard library's sources)")
    found = (p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file())
    return sorted(path for path in found if included(path))


def read_source(path: Path) -> str:
    """A source file's text as Python reads it: the declared encoding (UTF-8 by default),
    universal newlines, no byte-order mark."""
    with tokenize.open(path) as f:
        return f.read()


@dataclass(frozen=True)
class Corpus:
    """The corpus files under ``root``, by split (``Corpus.build()`` for this Python's stdlib)."""

    root: Path
    files: dict[str, tuple[str, ...]]  # split -> sorted relative paths

    @classmethod
    def build(cls, root: str | Path | None = None) -> Corpus:
        root = Path(root) if root is not None else stdlib_root()
        paths = list_files(root)
        files = {s: tuple(p for p in paths if split_of(p) == s) for s in SPLITS}
        return cls(root, files)

    def texts(self, split: str) -> Iterator[tuple[str, str]]:
        """``(relative path, text)`` of every file of ``split``, in sorted order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        for rel in self.files[split]:
            yield rel, read_source(self.root / rel)

    def gpt2_tokens(self, split: str) -> np.ndarray:
        """The split as one stream of GPT-2 ids (int32): every file's tokens, then
        ``<|endoftext|>``. A literal ``<|endoftext|>`` in a file is read as plain text."""
        texts = [text for _, text in self.texts(split)]
        parts = []
        for ids in get_tokenizer().encode_ordinary_batch(texts, num_threads=2):
            parts += [np.asarray(ids, dtype=np.int32), np.asarray([EOT_ID], dtype=np.int32)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def manifest(self) -> dict:
        """What a rebuild must match: the Python, the file and character counts per split and
        a SHA-256 over every file's path and text."""
        digest, splits = hashlib.sha256(), {}
        for split in SPLITS:
            chars = 0
            for rel, text in self.texts(split):
                chars += len(text)
                digest.update(rel.encode() + b"\0" + text.encode("utf-8", "surrogatepass") + b"\0")
            splits[split] = {"files": len(self.files[split]), "chars": chars}
        return {"source": "Python standard library (*.py)", "licence": LICENCE,
                "python": platform.python_version(),
                "implementation": platform.python_implementation(),
                "excluded_dirs": sorted(EXCLUDED_DIRS), "splits": splits,
                "sha256": digest.hexdigest()}
