"""Tokenizers: GPT-2's byte-pair encoding through tiktoken, and the interface every kvlib tokenizer
shares (``encode``, ``decode``, ``vocab_size``).

``kvlib.encode`` / ``kvlib.decode`` are GPT-2's. A model trained here (``kvlib.load_model(
"mini-gpt2")``) carries its own tokenizer, GPT-2's BPE with a trimmed vocabulary
(``kvlib.vocab``); ``tokenizer_for(model)`` returns the right one for any model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import tiktoken

EOT_ID = 50256  # <|endoftext|>
GPT2_VOCAB_SIZE = 50257


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` encoding (downloaded on first use, then cached)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # a failed download surfaces as requests/urllib/ssl errors
        raise RuntimeError(
            "tiktoken could not load the GPT-2 encoding files (it downloads them on first use). "
            "Offline, point the environment variable TIKTOKEN_CACHE_DIR at a folder that holds "
            "them, e.g. export TIKTOKEN_CACHE_DIR=/path/to/tiktoken-cache, and restart Python. "
            f"Cause: {type(err).__name__}: {err}"
        ) from err


def encode(text: str) -> list[int]:
    """Token ids for ``text`` (GPT-2's ``<|endoftext|>`` is allowed)."""
    return get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})


def decode(ids: list[int]) -> str:
    """Text for token ids."""
    return get_tokenizer().decode(ids)


@runtime_checkable
class Tokenizer(Protocol):
    """What every kvlib tokenizer offers: text to ids and back, and how many ids there are."""

    vocab_size: int
    eot_id: int  # the id of <|endoftext|>

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class GPT2Tokenizer:
    """GPT-2's tokenizer behind the shared interface: ``kvlib.encode`` and ``kvlib.decode``."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_id = EOT_ID

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return "GPT2Tokenizer(vocab_size=50257)"


GPT2 = GPT2Tokenizer()


def tokenizer_for(model) -> Tokenizer:
    """The tokenizer of ``model``: its own (``model.tokenizer``, which the models trained here
    carry), else GPT-2's. A model whose vocabulary is smaller than GPT-2's and that carries no
    tokenizer raises: GPT-2's ids would not fit it."""
    own = getattr(model, "tokenizer", None)
    if own is not None:
        return own
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", GPT2_VOCAB_SIZE)
    if vocab < GPT2_VOCAB_SIZE:
        raise ValueError(
            f"this model has {vocab} token ids and carries no tokenizer (model.tokenizer), and "
            f"GPT-2's ids go up to {GPT2_VOCAB_SIZE - 1}: load it with kvlib.load_model, which "
            "attaches the tokenizer saved beside its weights (vocab.json)")
    return GPT2
