"""The book's pointers point somewhere, and its code fits the book's column.

References, checked in every markdown cell of the chapters and every page ``book/*.md``:

- ``chapter N`` (also ``chapters N and M``, ``chapters N to M``) names a chapter of ``_toc.yml``,
  numbered in the order the table of contents lists them (each chapter's title, ``# N. Title``,
  carries its own number). A chapter still to be written may be named only if it is one of
  ``UPCOMING`` and the sentence that names it says it is coming.
- ``section N`` names a numbered section (``## N. Title``) of the chapter it is written in, or of
  chapter M when it says ``chapter M, section N`` or ``chapter M's section N``; a page of
  ``book/`` has no sections of its own, so there it must name its chapter. ``their section N``
  is a paper's, and is not checked.
- ``exercise N`` names an exercise (``**N. Title.**`` after the chapter's ``## Exercises``) of
  its chapter, or of chapter M when it says ``chapter M's exercise N``; and it seems to mean
  that one: the sentence does not name only code that another exercise uses and this one does
  not (``raise `PROMPT_LEN` (exercise 3)`` when exercise 4 is the one that raises it), nor the
  whole title of another exercise (``the receptive field (exercise 1)`` when exercise 2 is
  *The receptive field*).
- A title given with its number, ``chapter N, *Title*`` or ``chapter N (*Title*)``, fits that
  chapter's title: its words, less articles, are words of the title. The introduction's plan
  lists every chapter in order, under its number and a title that fits.

Code: no line of a chapter's code cells is longer than ``LINE_LENGTH`` characters, except the
Colab setup cell's ``%pip install`` line, which must stay one copyable line. ruff checks the same
(``notebooks/ruff.toml``); this test names the chapters that do not fit yet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE_LENGTH = 88

# Chapters planned but not written yet: the prose may name them, saying they are coming.
UPCOMING: dict[int, str] = {}  # chapters named before they are written (say "coming")

# Chapters rewritten next on new models, left as they are until then; each mark flips (strict
# xfail) once its chapter is fixed, and then goes.
REWRITTEN_NEXT = "rewritten next on new models; fixed then, and this mark removed"
WRONG_REFS: dict[str, str] = {}
LONG_LINES: set[str] = set()

_NUMS = r"\d+(?:(?:\s*,\s*|\s+and\s+|\s+or\s+|\s+to\s+|\s*[-–]\s*)\d+)*"
_REF = re.compile(
    r"(?P<before>\b\w+\s+)?"
    r"(?:(?P<owner>[Cc]hapter\s+(?P<owner_n>\d+))(?:'s|,)\s+)?"
    r"\b(?P<kind>[Cc]hapters?|[Ss]ections?|[Ee]xercises?)\s+(?P<nums>" + _NUMS + r")\b"
    r"(?:(?:,\s+|\s+\()\*(?P<title>[^*]+)\*)?")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z*(`{])|\n\s*\n")
_COMING = re.compile(r"\b(?:up)?coming\b", re.I)
_SECTION = re.compile(r"^## (\d+)\. ", re.M)
_EXERCISE = re.compile(r"^\*\*(\d+)\. (.+?)\.?\*\*", re.M)
_ARTICLES = {"a", "an", "the"}


def _source(cell: dict) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def chapters() -> list[Path]:
    """The chapters in the order of ``_toc.yml``: chapter N is the N-th."""
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    return [ROOT / f"{name}.ipynb" for name in re.findall(r"file:\s*(notebooks/\S+)", toc)]


def markdown_cells(path: Path) -> list[tuple[int, str]]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(i, _source(c)) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]


class Chapter:
    """What a chapter's references may name: its number, title, sections and exercises."""

    def __init__(self, number: int, path: Path):
        cells = markdown_cells(path)
        text = "\n\n".join(src for _, src in cells)
        head = re.match(r"# (\d+)\. (.+)", cells[0][1]) if cells else None
        self.number, self.path = number, path
        self.written_number = int(head.group(1)) if head else None
        self.title = head.group(2).strip() if head else ""
        self.sections = {int(n) for n in _SECTION.findall(text)}
        tail = text.split("\n## Exercises", 1)
        tail = tail[1].split("\n## Summary")[0] if len(tail) == 2 else ""
        # exercise N: its title and its text, up to the next exercise (its solution's notes too)
        starts = list(_EXERCISE.finditer(tail)) + [None]
        self.exercises = {
            int(m.group(1)): (m.group(2), tail[m.start():nxt.start() if nxt else len(tail)])
            for m, nxt in zip(starts[:-1], starts[1:], strict=True)}


def book() -> dict[int, Chapter]:
    return {n: Chapter(n, path) for n, path in enumerate(chapters(), 1)}


def _numbers(nums: str) -> list[int]:
    """``3``, ``2 and 5``, ``1, 2 and 4``, ``8 to 10``, ``2-3`` as the numbers they name."""
    found = [int(n) for n in re.findall(r"\d+", nums)]
    if len(found) == 2 and re.search(r"\s+to\s+|[-–]", nums):
        return list(range(found[0], found[1] + 1))
    return found


def _words(title: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9'-]+", title.lower()) if w not in _ARTICLES}


def _sentences(text: str) -> list[str]:
    return _SENTENCE_END.split(text)


def _identifiers(text: str) -> set[str]:
    """The names in the inline code of ``text`` (``PROMPT_LEN``, ``Engine.fork``: ``Engine``,
    ``fork``), less one- and two-letter ones."""
    return {name for span in re.findall(r"`([^`\n]+)`", text)
            for name in re.findall(r"[A-Za-z_]\w{2,}", span)}


def _misplaced_exercise(sentence: str, n: int, exercises: dict[int, tuple[str, str]]) -> str:
    """Why ``sentence``, which points at exercise ``n``, seems to mean another one: it names code
    that only another exercise uses, or another exercise's whole title (of two words or more)."""
    names = _identifiers(sentence)
    if names and not names & _identifiers(exercises[n][1]):
        others = [k for k, (_, text) in exercises.items() if k != n and names & _identifiers(text)]
        if others:
            return (f"it names {sorted(names)}, which exercise {n} does not use and exercise "
                    f"{others[0]} does")
    words = _words(_CODE.sub(" ", sentence))
    if not _words(exercises[n][0]) <= words:
        for k, (title, _) in exercises.items():
            if k != n and len(_words(title)) >= 2 and _words(title) <= words:
                return f"it names the subject of exercise {k}, {title!r}"
    return ""


def problems(text: str, here: int | None, chapters_: dict[int, Chapter]) -> list[str]:
    """What is wrong with the references of ``text``, markdown written in chapter ``here``
    (``None``: a page of ``book/``)."""
    out = []
    for sentence in _sentences(_COMMENT.sub(" ", text)):
        coming = bool(_COMING.search(sentence))
        for m in _REF.finditer(_CODE.sub(" ", sentence)):
            if m.group("before") and m.group("before").strip().lower() == "their":
                continue  # a paper's section
            kind = m.group("kind").lower().rstrip("s")
            said = " ".join(m.group(0).split())
            owners = _numbers(m.group("nums")) if kind == "chapter" else (
                [int(m.group("owner_n"))] if m.group("owner") else [])
            for n in owners:
                if n in chapters_:
                    continue
                if n not in UPCOMING:
                    out.append(f"{said!r}: there is no chapter {n}")
                elif not coming:
                    out.append(f"{said!r}: chapter {n} is not written yet, and the sentence "
                               "does not say it is coming")
            if m.group("title"):
                n = owners[-1] if owners else here
                title = chapters_[n].title if n in chapters_ else UPCOMING.get(n, "")
                if not _words(m.group("title")) <= _words(title):
                    out.append(f"{said!r}: chapter {n} is {title!r}")
            if kind == "chapter":
                continue
            owner = int(m.group("owner_n")) if m.group("owner") else here
            if owner is None:
                out.append(f"{said!r}: a page has no {kind}s; name the chapter "
                           f"('chapter M, {kind} N')")
                continue
            if owner not in chapters_:
                continue  # reported above
            chapter = chapters_[owner]
            have = chapter.sections if kind == "section" else set(chapter.exercises)
            for n in _numbers(m.group("nums")):
                if n not in have:
                    out.append(f"{said!r}: chapter {owner} has no {kind} {n} "
                               f"(its {kind}s: {sorted(have)})")
                elif kind == "exercise" and (why := _misplaced_exercise(
                        sentence, n, chapter.exercises)):
                    out.append(f"{said!r} in {' '.join(sentence.split())!r}: {why}")
    return out


BOOK = book()
PAGES = sorted((ROOT / "book").glob("*.md"))


def _chapter_param(n: int, chapter: Chapter, broken: dict[str, str] | set[str], reason=None):
    stem = chapter.path.stem
    marks = ()
    if stem in broken:
        why = broken[stem] if isinstance(broken, dict) else reason
        marks = pytest.mark.xfail(strict=True, reason=why)
    return pytest.param(n, id=stem, marks=marks)


@pytest.mark.parametrize("n", [_chapter_param(n, c, WRONG_REFS) for n, c in BOOK.items()])
def test_a_chapters_references_name_what_exists(n):
    chapter = BOOK[n]
    assert chapter.written_number == n, (
        f"{chapter.path.name} is chapter {n} of _toc.yml but its title says "
        f"{chapter.written_number}")
    found = [f"cell {i}: {p}" for i, src in markdown_cells(chapter.path)
             for p in problems(src, n, BOOK)]
    assert not found, f"{chapter.path.name}:\n" + "\n".join(found)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_a_pages_references_name_what_exists(page):
    found = problems(page.read_text(encoding="utf-8"), None, BOOK)
    assert not found, f"{page.name}:\n" + "\n".join(found)


def test_the_introduction_lists_every_chapter_in_order():
    intro = (ROOT / "book" / "intro.md").read_text(encoding="utf-8")
    listed = re.findall(r"^(\d+)\.\s+\{doc\}`([^`<]+?)\s*<\.\./notebooks/([^>]+)>`", intro, re.M)
    assert [(int(n), f"notebooks/{name}") for n, _, name in listed] == [
        (n, f"notebooks/{c.path.stem}") for n, c in BOOK.items()]
    for n, title, _ in listed:
        assert _words(title) <= _words(BOOK[int(n)].title), (title, BOOK[int(n)].title)
    coming = re.findall(r"^(\d+)\.\s+\*([^*]+)\*\s+\(coming\)", intro, re.M)
    assert [(int(n), t) for n, t in coming] == sorted(UPCOMING.items())


# The checker itself, on a book of two small chapters.

_FAKE = {
    1: ["# 1. Generating text without a cache\n\n## 1. The loop\n\n## 2. The cost",
        "## Exercises\n\n**1. Sampling.** Use `temperature`.",
        "**2. Longer texts.** Raise `PROMPT_LEN`.\n\n## Summary"],
    2: ["# 2. The KV cache\n\n## 1. Keys\n\n## 7. Speed", "## Exercises\n\n**4. Four.** Go."],
}


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    folder = tmp_path_factory.mktemp("book")
    chapters_ = {}
    for n, cells in _FAKE.items():
        path = folder / f"0{n}.ipynb"
        path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": c}
                                              for c in cells]}), encoding="utf-8")
        chapters_[n] = Chapter(n, path)
    return chapters_


@pytest.mark.parametrize("text", [
    "as chapter 99 shows",
    "chapters 2 and 13 use it",
    "chapters 1 to 12 use it",
    "exercise 7 measures it",
    "section 9 measures it",
    "sections 1 and 3 measure it",
    "chapter 2's exercise 9",
    "chapter 2, section 2",
    "chapter 12 covers it.",
    "chapter 2, *The sliding window*",
    "raise `PROMPT_LEN` to see more (exercise 1).",
    "how the longer texts behave (exercise 1).",
])
def test_flags_a_pointer_to_nothing(fake, text):
    assert problems(text, 1, fake), text


@pytest.mark.parametrize("text", [
    "chapter 2 keeps them; chapters 1 and 2 use it",
    "section 2 counts them, exercise 2 asks, sections 1 and 2",
    "chapter 2's exercise 4 and chapter 2, section 7",
    "their section 3 trains models",
    "chapter 2, *The KV cache*, and chapter 1",
    "chapter 2, *The KV cache*",
    "`chapter 99` in code is not a reference",
    "raise `PROMPT_LEN` to see more (exercise 2).",
    "longer texts: exercise 2.",
])
def test_passes_a_pointer_that_exists(fake, text):
    assert problems(text, 1, fake) == [], text


def test_a_page_must_name_the_chapter_of_a_section(fake):
    assert problems("as section 2 shows", None, fake)
    assert problems("as chapter 1, section 2 shows", None, fake) == []


# Code that fits the book's column.

def long_lines(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [f"cell {i}, line {k}: {len(line)} characters: {line.strip()[:60]}..."
            for i, cell in enumerate(cells) if cell["cell_type"] == "code"
            for k, line in enumerate(_source(cell).split("\n"), 1)
            if len(line) > LINE_LENGTH and not line.lstrip().startswith("%pip install ")]


@pytest.mark.parametrize("n", [_chapter_param(n, c, LONG_LINES, REWRITTEN_NEXT)
                               for n, c in BOOK.items()])
def test_code_fits_the_books_column(n):
    found = long_lines(BOOK[n].path)
    assert not found, (f"{BOOK[n].path.name}: {len(found)} line(s) over {LINE_LENGTH} "
                       "characters:\n" + "\n".join(found))


def test_long_lines_finds_a_wide_line_but_not_the_colab_install(tmp_path):
    pip = '    %pip install -q "kvlib @ git+https://example.org/' + "x" * 80 + '.git"'
    cells = [{"cell_type": "code", "source": f"import sys\n{pip}\nx = 1  # {'y' * 80}"},
             {"cell_type": "markdown", "source": "z" * 200}]
    path = tmp_path / "wide.ipynb"
    path.write_text(json.dumps({"cells": cells}), encoding="utf-8")
    assert [line.split(":")[0] for line in long_lines(path)] == ["cell 0, line 3"]
