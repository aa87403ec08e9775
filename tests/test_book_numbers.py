"""The book's prose never states a measured number by hand.

The rule, checked on every markdown cell of ``notebooks/*.ipynb`` and every page ``book/*.md``:
a number written in digits directly followed by one of these units is an error,

- time: ``ns``, ``µs``/``us``, ``ms``, ``s`` (after a space: ``57 s``), ``sec``, ``second(s)``,
  ``millisecond(s)``, ``microsecond(s)``, ``minute(s)``, ``min``, ``hour(s)``;
- memory: ``byte(s)``, ``kB``/``KB``, ``MB``, ``GB``, ``TB``, ``KiB``, ``MiB``, ``GiB``, ``TiB``,
  and ``B`` after a space (``512 B``; ``70B`` is a parameter count, not bytes);
- throughput: ``tokens/s``, ``tok/s``, ``tokens per second``, ``it/s``;
- ratios: a multiplier ``2.3x`` or ``2.3×`` (no space before the sign: ``2 × layers`` is a formula),
  ``16 times``, and percentages ``40%``, ``40 %``, ``40 percent``;

unless it is not written by hand at all:

- inside a MyST-NB glue role (``{glue:text}`name:.1f` ms``: the code computes the number and the
  prose only names it); the unit beside the role is fine;
- or named by a marker on the same line, ``<!-- static "4 bytes": float32 stores 4 bytes per value
  -->``, for a fact that no run can change (a data type's width, a cited paper's figure). The marker
  names the exact literal and gives a reason; it exempts only that literal on that line, and a
  marker whose literal is not on its line is an error too (it went stale). Keep them few.

Before matching, a line loses its HTML comments, glue roles and URLs, and its math is read as text
(``$4$ GiB`` is ``4 GiB``, ``40{,}960`` is ``40,960``). Code blocks inside markdown are scanned
too: a comment such as ``# 1500 MiB`` restates a run as surely as a sentence does (run such code in
a code cell instead). Numbers without a unit (``1024 positions``, ``12 layers``) are not checked:
static facts stay literal, and a count that a run computes is glued by review, not by this test.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK_FILES = sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("book/*.md"))

_NUMBER = r"(?<![\w.,])\d[\d,]*(?:\.\d+)?"
_UNITS = {  # kind -> what may follow the number (case-sensitive)
    "a time": r"[-\s]?(?:ns|µs|μs|us|ms|secs?|(?:milli|micro|nano)?seconds?|minutes?|mins?|hours?)"
              r"\b|\s+s\b",
    "a size": r"[-\s]?(?:bytes?|[kKMGT]B|[KMGT]iB)\b|\s+B\b",
    "a throughput": r"\s?(?:tokens/s|tok/s|it/s)|\s+tokens (?:per|a) second\b",
    "a ratio": r"[x×](?!\w)|\s+times\b|\s?(?:%|percent\b)",
}
_PATTERNS = {kind: re.compile(f"{_NUMBER}(?:{units})") for kind, units in _UNITS.items()}
_MARKER = re.compile(r'<!--\s*static\s+"([^"]+)"\s*:\s*([^>]*?)\s*-->')
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_GLUE = re.compile(r"\{glue(?::\w*)?\}`[^`]*`")
_URL = re.compile(r"https?://[^\s)>\]]+")
_TEXT_MACRO = re.compile(r"\\(?:text|mathrm|textrm)\{([^{}]*)\}")


@dataclass(frozen=True)
class Finding:
    line: int  # 1-based, in the text scanned
    literal: str
    kind: str
    text: str

    def describe(self) -> str:
        if self.kind == "stale marker":
            return f'a static marker names "{self.literal}", which is not on its line'
        if self.kind == "marker without a reason":
            return f'the static marker for "{self.literal}" gives no reason'
        return f'"{self.literal}" ({self.kind}) written by hand: glue it or let a cell print it'


def _readable(line: str) -> str:
    """The line as the reader sees its numbers: no glue roles, URLs or comments; math as text."""
    line = _GLUE.sub(" ", _URL.sub(" ", line))
    line = _TEXT_MACRO.sub(r"\1", line.replace("{,}", ","))
    for space in ("\\,", "\\;", "\\ ", "~"):
        line = line.replace(space, " ")
    return line.replace("$", "")


def scan_text(text: str) -> list[Finding]:
    """Every number with a unit written by hand in ``text`` (markdown), line by line."""
    # Comments go first (keeping the line count), so commented-out text and markers never count.
    markers = [_MARKER.findall(line) for line in text.split("\n")]
    text = _COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found = []
    for n, (line, marks) in enumerate(zip(text.split("\n"), markers, strict=True), 1):
        readable = _readable(line)
        hits = [(m.group(0), kind) for kind, pat in _PATTERNS.items()
                for m in pat.finditer(readable)]
        allowed = {" ".join(lit.split()) for lit, _ in marks}
        found += [Finding(n, lit, kind, line.strip()) for lit, kind in hits
                  if " ".join(lit.split()) not in allowed]
        written = {" ".join(lit.split()) for lit, _ in hits}
        for lit, reason in marks:
            if " ".join(lit.split()) not in written:
                found.append(Finding(n, lit, "stale marker", line.strip()))
            elif not reason:
                found.append(Finding(n, lit, "marker without a reason", line.strip()))
    return found


def _markdown_parts(path: Path) -> list[tuple[str, int, str]]:
    """(label, line in the file of the part's first line, markdown) for a page or a notebook's
    markdown cells; a notebook's line numbers are those of its JSON file when it is laid out as
    nbformat writes it (one source line per JSON line), else counted from the cell."""
    if path.suffix != ".ipynb":
        return [("", 1, path.read_text(encoding="utf-8"))]
    raw = path.read_text(encoding="utf-8").split("\n")
    parts = []
    for i, cell in enumerate(json.loads("\n".join(raw))["cells"]):
        if cell["cell_type"] == "markdown":
            source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            parts.append((f" (cell {i})", _source_line(raw, cell.get("id")) or 1, source))
    return parts


def _source_line(raw: list[str], cell_id: str | None) -> int | None:
    """The line of the file that holds a cell's first source line, as nbformat lays it out."""
    starts = [k for k, line in enumerate(raw) if line.strip() == f'"id": "{cell_id}",']
    for k in range(starts[0] if len(starts) == 1 else len(raw), len(raw)):
        if raw[k].strip().startswith('"source": ['):
            return k + 2  # the next line, counted from 1
        if raw[k].strip().startswith(('"source"', '"cell_type"')):
            return None  # a one-string source, or the next cell
    return None


def findings(path: Path) -> list[str]:
    """``file:line (cell): what`` for every hand-written measurement in a book file."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    out = []
    for label, start, text in _markdown_parts(path):
        for f in scan_text(text):
            out.append(f"{rel}:{start + f.line - 1}{label}: {f.describe()}\n    {f.text}")
    return out


@pytest.mark.parametrize("path", BOOK_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_measured_number_written_by_hand(path):
    found = findings(path)
    if found:
        pytest.fail(f"{len(found)} number(s) with a unit written by hand (the rule: "
                    "tests/test_book_numbers.py):\n" + "\n".join(found), pytrace=False)


# The checker itself: it must fail on what it is meant to catch, and only on that.

@pytest.mark.parametrize("line,literal", [
    ("chapter 2 ran in 57 s on this machine", "57 s"),
    ("a decode step takes 41.2 ms here", "41.2 ms"),
    ("950 µs per step", "950 µs"),
    ("the run took 3 minutes", "3 minutes"),
    ("a 60-second run", "60-second"),
    ("the cache holds 73,728 bytes per token", "73,728 bytes"),
    ("at 128k tokens it needs 14 GiB", "14 GiB"),
    ("about 0.5 GB of weights", "0.5 GB"),
    ("a 512 B block", "512 B"),
    ("an 8-bit (1-byte) cache", "1-byte"),
    ("prealloc is 2.3x faster", "2.3x"),
    ("2-8x less cache", "8x"),
    ("3× less memory", "3×"),
    ("a model 45 times larger", "45 times"),
    ("87% of the time", "87%"),
    ("only 20 to 40 % of it", "40 %"),
    ("38.9 tokens/s with prealloc", "38.9 tokens/s"),
    ("about 500 tokens per second", "500 tokens per second"),
    ("Each text needs $131{,}072 \\times 32{,}768$ bytes $= 4$ GiB", "4 GiB"),
    ("$2 \\times 80 = 40{,}960$ bytes per token", "40,960 bytes"),
    ("a step of $41\\,\\text{ms}$", "41 ms"),
    ("print(copied)  # 1500 MiB: read once and written once", "1500 MiB"),
])
def test_flags_a_measurement_written_by_hand(line, literal):
    found = scan_text(f"Some prose.\n{line}\n")
    assert [(f.line, f.literal) for f in found if f.literal == literal] == [(2, literal)], found


@pytest.mark.parametrize("line", [
    "On this machine a step took {glue:text}`step_ms:.1f` ms, {glue:text}`speedup:.1f`x faster.",
    "It needs {glue:text}`ch03::qwen_gib` GiB at {glue:text}`qwen_ctx:,d` tokens.",
    "GPT-2 has 1024 learned positions and 12 layers of 12 heads.",
    "Llama 3 70B and the 0.6B-parameter Qwen3, 1.6B parameters, 124M weights",
    "at 8k, 32k and 128k tokens, a 32k-token text, the 1990s",
    "$2 \\times n_\\text{layers} \\times 4$ layers, 2 × layers × kv heads",
    "[the paper](https://arxiv.org/abs/2211.05102) and https://example.org/10ms/64GB",
    "<!-- an old draft said 57 s here -->",
    "a hex address 0x7f3a2b, a 4x4 grid, GPT-2 small",
    "a few KiB, tens of kilobytes, several milliseconds, twice as fast",
    "64 texts times 50,257 logits",
])
def test_passes_what_is_not_a_hand_written_measurement(line):
    assert scan_text(line) == []


def test_a_comment_spanning_lines_hides_its_numbers_and_keeps_the_line_count():
    found = scan_text("<!-- 57 s\n41 ms -->\nnow 12 ms")
    assert [(f.line, f.literal) for f in found] == [(3, "12 ms")]


def test_a_static_marker_exempts_only_its_literal_on_its_line():
    text = ('float32 (4 bytes) holds 73,728 bytes <!-- static "4 bytes": float32\'s width -->\n'
            "bfloat16 has 4 bytes too")
    found = scan_text(text)
    assert [(f.line, f.literal) for f in found] == [(1, "73,728 bytes"), (2, "4 bytes")]


def test_a_stale_marker_or_one_without_a_reason_is_an_error():
    found = scan_text('no such number here <!-- static "4 bytes": float32 -->\n'
                      'float32 (4 bytes) <!-- static "4 bytes": -->')
    assert [(f.line, f.kind) for f in found] == [(1, "stale marker"),
                                                 (2, "marker without a reason")]


def test_reports_every_offence_with_its_file_line(tmp_path):
    nb = {"cells": [{"cell_type": "markdown", "id": "aa", "metadata": {},
                     "source": ["# Title\n", "ran in 57 s\n", "and 41 ms"]},
                    {"cell_type": "code", "id": "bb", "metadata": {}, "outputs": [],
                     "execution_count": None, "source": ["print('9 ms')"]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "ch.ipynb").write_text(json.dumps(nb, indent=1) + "\n")
    (tmp_path / "page.md").write_text("# Page\n\nIt took {glue:text}`t` s.\nIt took 3 s.\n")
    got = findings(tmp_path / "ch.ipynb") + findings(tmp_path / "page.md")
    lines = (tmp_path / "ch.ipynb").read_text().split("\n")
    first = lines.index('    "ran in 57 s\\n",') + 1  # counted from 1
    assert [g.split(": ")[0] for g in got] == [f"{tmp_path}/ch.ipynb:{first} (cell 0)",
                                               f"{tmp_path}/ch.ipynb:{first + 1} (cell 0)",
                                               f"{tmp_path}/page.md:4"]
    assert '"57 s" (a time) written by hand' in got[0]


# Glue: every role must find its value, or the book build (-W) fails; checked here on the committed
# outputs so that a typo shows without building the book.

def glued_keys(nb: dict) -> list[str]:
    """The names a notebook's committed outputs glue (MyST-NB's scrapbook records)."""
    return [o["metadata"]["scrapbook"]["name"] for c in nb["cells"] if c["cell_type"] == "code"
            for o in c.get("outputs", []) if "scrapbook" in o.get("metadata", {})]


def glue_refs(text: str) -> list[str]:
    """The keys (``doc::key`` for another notebook's) that glue roles in ``text`` refer to."""
    return [role.rsplit(":", 1)[0] if role.count(":") % 2 else role  # drop a format spec
            for role in re.findall(r"\{glue(?::\w*)?\}`([^`]*)`", text)]


def test_glue_refs_strip_the_format_spec():
    assert glue_refs("{glue:text}`a:.1f` and {glue}`b` and {glue:text}`ch03::c:,d`") == [
        "a", "b", "ch03::c"]


@pytest.mark.parametrize("path", BOOK_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_glue_role_finds_its_value(path):
    local = glued_keys(json.loads(path.read_text())) if path.suffix == ".ipynb" else []
    assert not {k for k in local if local.count(k) > 1}, "a key glued twice (the build warns)"
    missing = []
    for _, _, text in _markdown_parts(path):
        for ref in glue_refs(text):
            doc, _, key = ref.rpartition("::")
            if doc:
                other = (path.parent / doc).with_suffix(".ipynb")
                known = glued_keys(json.loads(other.read_text())) if other.exists() else []
            else:
                known = local
            if key not in known:
                missing.append(ref)
    assert not missing, f"glue roles with no glued value in the committed outputs: {missing}"
