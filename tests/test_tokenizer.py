"""GPT-2's tokenizer through tiktoken, the error when its files are missing, the interface every
kvlib tokenizer shares, and the trimmed vocabulary of the models trained here (kvlib.vocab)."""

import numpy as np
import pytest
import torch

import kvlib
from kvlib.tokenizer import GPT2, GPT2_VOCAB_SIZE, Tokenizer, get_tokenizer, tokenizer_for
from kvlib.vocab import TrimmedTokenizer


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


# --- the shared interface, and the trimmed vocabulary ------------------------------------------

TEXTS = [
    "Hello, world!",
    "def f(self, x):\n    return {'a': x ** 2}  # squared\n\n\tpass\r\n",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji: 🙂👍🏽🧑‍💻 and flags 🇫🇷; math: ∑ x² ≤ ∞",
    "<|endoftext|>between<|endoftext|>",
    "",
    " \x00\x7f\u200b\ufeff trailing spaces   ",
]


def counts_of(text: str) -> np.ndarray:
    return np.bincount(get_tokenizer().encode_ordinary(text), minlength=GPT2_VOCAB_SIZE)


@pytest.fixture(scope="module")
def small_vocab() -> TrimmedTokenizer:
    """A vocabulary of 300 ids from a little code: most GPT-2 tokens of TEXTS are not in it."""
    return TrimmedTokenizer.from_counts(counts_of("def return self import for in if else " * 5),
                                        vocab_size=300)


def test_gpt2_tokenizer_behind_the_interface():
    assert isinstance(GPT2, Tokenizer) and GPT2.vocab_size == 50257 and GPT2.eot_id == kvlib.EOT_ID
    assert GPT2.encode("Hello there") == kvlib.encode("Hello there")
    assert GPT2.decode(torch.tensor(kvlib.encode("Hello there"))) == "Hello there"


@pytest.mark.parametrize("text", TEXTS)
def test_trimmed_tokenizer_round_trips_any_text(small_vocab, text):
    ids = small_vocab.encode(text)
    assert all(0 <= i < small_vocab.vocab_size for i in ids)
    assert small_vocab.decode(ids) == text


def test_trimmed_vocabulary_layout(small_vocab):
    tok = small_vocab
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 300
    assert list(tok.gpt2_ids[:256]) == list(range(256))  # the bytes keep their ids
    assert tok.eot_id == 299 and tok.gpt2_ids[-1] == kvlib.EOT_ID  # <|endoftext|> comes last
    assert tok.encode("<|endoftext|>") == [tok.eot_id]
    kept = set(tok.gpt2_ids)
    assert {GPT2.encode(w)[0] for w in (" return", " self", "def")} <= kept  # the frequent ones


def test_a_token_not_kept_is_written_as_its_bytes(small_vocab):
    enc = get_tokenizer()
    word = " Hello"
    (gpt2_id,) = GPT2.encode(word)
    assert gpt2_id not in small_vocab.gpt2_ids and not small_vocab.kept([gpt2_id])[0]
    byte_ids = [enc.encode_single_token(bytes([b])) for b in word.encode()]
    assert small_vocab.spell(gpt2_id) == byte_ids == small_vocab.encode(word)
    # a multi-byte character falls apart into its UTF-8 bytes and comes back whole
    assert len(small_vocab.encode("日")) == len("日".encode()) == 3
    assert small_vocab.decode(small_vocab.encode("日")) == "日"


def test_trimmed_ids_map_back_to_gpt2(small_vocab):
    text = "def return self import for"
    gpt2_ids = GPT2.encode(text)
    assert small_vocab.to_gpt2(small_vocab.encode(text)).tolist() == gpt2_ids  # all kept here
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        small_vocab.decode([300])


def test_from_counts_picks_the_most_frequent_and_breaks_ties_by_id():
    counts = np.zeros(GPT2_VOCAB_SIZE, dtype=np.int64)
    counts[[1000, 2000, 3000, 4000]] = [5, 9, 9, 1]
    tok = TrimmedTokenizer.from_counts(counts, vocab_size=259)
    assert tok.gpt2_ids[256:] == (2000, 3000, kvlib.EOT_ID)
    with pytest.raises(ValueError, match="vocab_size"):
        TrimmedTokenizer.from_counts(counts, vocab_size=100)
    with pytest.raises(ValueError, match="byte tokens"):
        TrimmedTokenizer([kvlib.EOT_ID, *range(1, 256)])


def test_vocab_file_round_trip(tmp_path, small_vocab):
    small_vocab.save(tmp_path / "vocab.json", corpus="test")
    assert TrimmedTokenizer.load(tmp_path / "vocab.json") == small_vocab
    (tmp_path / "bad.json").write_text('{"gpt2_ids": [1, 2]}')
    with pytest.raises(ValueError, match="not a kvlib vocabulary file"):
        TrimmedTokenizer.load(tmp_path / "bad.json")


def test_tokenizer_for(small_vocab, make_model):
    model = make_model("tiny")
    assert tokenizer_for(model) is GPT2
    model.tokenizer = small_vocab
    assert tokenizer_for(model) is small_vocab
    with pytest.raises(ValueError, match="carries no tokenizer"):
        tokenizer_for(make_model("tiny", vocab_size=300))


# --- runs of spaces ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs_vocab() -> TrimmedTokenizer:
    return TrimmedTokenizer.from_counts(counts_of("def return self import for in if else " * 5),
                                        vocab_size=310, max_space_run=8)


def test_space_runs_come_after_the_gpt2_ids(runs_vocab):
    tok = runs_vocab
    assert tok.vocab_size == 310 and tok.n_gpt2 == 303 and tok.gpt2_ids[-1] == kvlib.EOT_ID
    assert tok.encode("  ") == [303] and tok.encode(" " * 8) == [309]  # 2 and 8 spaces
    assert tok.encode(" ") == [tok.space_id] == [220]


@pytest.mark.parametrize("n", [2, 3, 7, 8, 9, 10, 16, 17, 25])
def test_a_run_of_spaces_is_merged_greedily(runs_vocab, n):
    tok = runs_vocab
    ids = tok.encode(" " * n + "return")  # GPT-2: n - 1 spaces and " return" (kept)
    full, rest = divmod(n - 1, 8)
    expected = [309] * full + ([220] if rest == 1 else [301 + rest] if rest else [])
    assert ids[:-1] == expected and tok.decode(ids) == " " * n + "return"


@pytest.mark.parametrize("text", TEXTS + ["    def f():\n        return 1\n\n" * 3, " " * 60])
def test_space_runs_round_trip_any_text(runs_vocab, text):
    ids = runs_vocab.encode(text)
    assert all(0 <= i < runs_vocab.vocab_size for i in ids)
    assert runs_vocab.decode(ids) == text


def test_space_runs_shorten_indented_code(small_vocab, runs_vocab):
    code = "class A:\n    def f(self):\n        if x:\n            return 1\n"
    assert len(runs_vocab.encode(code)) < len(small_vocab.encode(code)) - 15


def test_space_runs_are_saved_and_checked(tmp_path, runs_vocab):
    runs_vocab.save(tmp_path / "vocab.json")
    back = TrimmedTokenizer.load(tmp_path / "vocab.json")
    assert back == runs_vocab and back.max_space_run == 8
    assert back != TrimmedTokenizer(runs_vocab.gpt2_ids)  # the same ids without runs differ
    with pytest.raises(ValueError, match="max_space_run"):
        TrimmedTokenizer(runs_vocab.gpt2_ids, max_space_run=1)
    with pytest.raises(ValueError, match="space runs"):
        TrimmedTokenizer.from_counts(np.zeros(GPT2_VOCAB_SIZE), vocab_size=260, max_space_run=8)
