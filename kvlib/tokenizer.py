"""GPT-2's byte-pair encoding, through tiktoken."""

from __future__ import annotations

import functools

import tiktoken


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


EOT_ID = 50256  # <|endoftext|>
