"""kvlib.corpus: which stdlib files are read, and a split by file that never changes."""

from collections import Counter

import numpy as np
import pytest

import kvlib
from kvlib.corpus import SPLITS, Corpus, included, list_files, split_of


@pytest.fixture
def fake_stdlib(tmp_path):
    """A small tree shaped like a stdlib: modules, packages, and everything that is left out."""
    files = {
        "os.py": "import sys\n", "json/__init__.py": "'''JSON.'''\n",
        "json/decoder.py": "# café\r\nx = 1\r\n",  # Windows newlines, a non-ASCII character
        "latin.py": "# -*- coding: latin-1 -*-\ns = 'é'\n",
        "site-packages/numpy/core.py": "x", "dist-packages/y.py": "x", "test/test_os.py": "x",
        "unittest/test/test_case.py": "x", "idlelib/idle_test/t.py": "x",
        "lib2to3/tests/data/bad.py": "x", "_sysconfigdata__linux.py": "x",
        "config-3.11-x86_64-linux-gnu/python-config.py": "x", "README.txt": "x",
        "email/mime/text.py": "endoftext: <|endoftext|>\n",
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("latin-1" if rel == "latin.py" else "utf-8"))
    return tmp_path


def test_only_library_sources_are_read(fake_stdlib):
    assert list_files(fake_stdlib) == ["email/mime/text.py", "json/__init__.py",
                                       "json/decoder.py", "latin.py", "os.py"]
    assert not included("test/support/__init__.py") and included("tests.py")


def test_files_are_read_as_python_reads_them(fake_stdlib):
    texts = dict(Corpus.build(fake_stdlib).texts(split_of("latin.py")))
    assert texts["latin.py"] == "# -*- coding: latin-1 -*-\ns = 'é'\n"
    corpus = Corpus.build(fake_stdlib)
    everything = {rel: text for s in SPLITS for rel, text in corpus.texts(s)}
    assert everything["json/decoder.py"] == "# café\nx = 1\n"


def test_the_split_is_by_file_deterministic_and_about_5_percent():
    paths = [f"pkg{i // 50}/module_{i}.py" for i in range(20000)]
    splits = [split_of(p) for p in paths]
    assert splits == [split_of(p) for p in paths]  # a pure function of the path
    share = Counter(splits)
    assert abs(share["test"] / len(paths) - 0.05) < 0.005
    assert abs(share["valid"] / len(paths) - 0.025) < 0.004


def test_splits_are_disjoint_and_cover_every_file(fake_stdlib):
    corpus = Corpus.build(fake_stdlib)
    seen = [rel for s in SPLITS for rel in corpus.files[s]]
    assert sorted(seen) == list_files(fake_stdlib) and len(set(seen)) == len(seen)
    assert all(split_of(rel) == s for s in SPLITS for rel in corpus.files[s])
    assert Corpus.build(fake_stdlib) == corpus


def test_tokens_end_every_file_with_endoftext(fake_stdlib):
    corpus = Corpus.build(fake_stdlib)
    for split in SPLITS:
        ids = corpus.gpt2_tokens(split)
        assert ids.dtype == np.int32
        assert int((ids == kvlib.EOT_ID).sum()) == len(corpus.files[split])  # text's own is plain
        texts = [text for _, text in corpus.texts(split)]
        assert kvlib.decode(ids.tolist()) == "".join(t + "<|endoftext|>" for t in texts)


def test_manifest_records_what_a_rebuild_must_match(fake_stdlib):
    m = Corpus.build(fake_stdlib).manifest()
    assert sum(m["splits"][s]["files"] for s in SPLITS) == 5
    assert m["python"].count(".") == 2 and "PSF" in m["licence"] and len(m["sha256"]) == 64
    (fake_stdlib / "os.py").write_text("import sys  # changed\n")
    assert Corpus.build(fake_stdlib).manifest()["sha256"] != m["sha256"]


def test_this_pythons_stdlib_gives_every_split():
    corpus = Corpus.build()  # lists files only: nothing is read
    assert all(len(corpus.files[s]) > 0 for s in SPLITS)
    assert "os.py" in corpus.files[split_of("os.py")]
    assert not any(p.startswith("test/") for s in SPLITS for p in corpus.files[s])
