"""GPT-2's tokenizer through tiktoken, and the error when its files are missing."""

import pytest

import kvlib


def test_tokenizer_round_trip():
    text = "Hello, I am a language model.<|endoftext|>"
    ids = kvlib.encode(text)
    assert ids[:2] == [15496, 11] and ids[-1] == kvlib.EOT_ID
    assert kvlib.decode(ids) == text


def test_tokenizer_failure_names_cache_dir(monkeypatch):
    import tiktoken

    from kvlib import tokenizer

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    tokenizer.get_tokenizer.cache_clear()
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR"):
        kvlib.encode("hello")
    tokenizer.get_tokenizer.cache_clear()
