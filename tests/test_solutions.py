"""Every exercise solution in the chapters runs, and every cache a solution writes is graded by
``kvlib.check_cache`` in the solution itself.

The convention (also in CONTRIBUTING.md):

- A solution is a code cell tagged ``solution`` and ``hide-cell`` (the book folds it under "Show
  the solution"), right after the exercise. Solutions are never markdown (``<details>``): markdown
  is never run.
- Every class a solution defines at top level whose base is a cache (a base named ``...Cache``,
  such as ``kvlib.KVCache`` or ``kvlib.PreallocCache``) is passed to ``kvlib.check_cache`` by a
  call in the same cell, so the passing checks are in the committed output.
- Every chapter that teaches a cache or a policy (``GRADED``) has a solution that calls a grader
  on what the reader wrote: ``check_cache`` for caches, ``check_quantizer``, ``check_victims``,
  ``check_slot_of``, ``check_absorbed`` for the other pieces.
- Nothing here executes a chapter: nbval executes each one once (``make test``), compares every
  output with the committed one, and fails on any cell that raises, a failed ``check_cache``
  included. This module checks the convention that makes that enough.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("notebooks/*.ipynb"))


def _solutions(nb) -> list[int]:
    return [i for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and "solution" in c.metadata.get("tags", [])]


def _tree(source: str) -> ast.Module:
    """The cell's code, IPython magics and shell lines blanked out."""
    return ast.parse("\n".join("" if line.lstrip().startswith(("%", "!")) else line
                               for line in source.split("\n")))


def _dotted(node: ast.expr) -> str:
    return ast.unparse(node)


def cache_classes(source: str) -> list[str]:
    """Names of the classes a cell defines at top level on a cache base (``...Cache``)."""
    return [node.name for node in _tree(source).body if isinstance(node, ast.ClassDef)
            and any(_dotted(base).split(".")[-1].endswith("Cache") for base in node.bases)]


def checked_names(source: str) -> set[str]:
    """Names passed first to a ``check_cache(...)`` call anywhere in the cell."""
    return {call.args[0].id for call in ast.walk(_tree(source))
            if isinstance(call, ast.Call) and _dotted(call.func).split(".")[-1] == "check_cache"
            and call.args and isinstance(call.args[0], ast.Name)}


def solution_problems(nb) -> list[str]:
    """What breaks the convention in a notebook: solutions in markdown, solution cells not hidden,
    cells shown as solutions but not tagged, caches a solution writes but never checks, solutions
    that do not run in the committed output."""
    problems = []
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags", [])
        prompt = cell.metadata.get("mystnb", {}).get("code_prompt_show", "")
        if cell.cell_type == "markdown":
            if re.search(r"<summary>\s*Solution", cell.source):
                problems.append(f"cell {i}: a solution in markdown (<details>), which nothing runs")
        elif "solution" in tags:
            if "hide-cell" not in tags:
                problems.append(f"cell {i}: a solution not tagged hide-cell")
            for name in sorted(set(cache_classes(cell.source)) - checked_names(cell.source)):
                problems.append(f"cell {i}: defines the cache {name} but never calls "
                                f"kvlib.check_cache({name}, ...) on it")
            if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
                problems.append(f"cell {i}: the committed output is an error")
        elif "solution" in prompt.lower():
            problems.append(f"cell {i}: shown as a solution but not tagged solution")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solutions_follow_the_convention(path):
    problems = solution_problems(nbformat.read(path, as_version=4))
    assert not problems, (f"{path.name} (convention: tests/test_solutions.py):\n  "
                          + "\n  ".join(problems))


# Every chapter that teaches a cache or a policy, and the graders its solutions call on what the
# reader wrote: the caches (check_cache), the block table's slot lookup, a quantizer and an
# eviction rule, the absorbed query.
GRADED = {
    "02_kv_cache.ipynb": {"check_cache"},  # the concat cache
    "04_prealloc.ipynb": {"check_cache"},  # the preallocated cache
    "05_sliding_window.ipynb": {"check_cache"},  # the ring
    "08_streaming.ipynb": {"check_cache"},  # the sink cache
    "09_serving.ipynb": {"check_slot_of"},  # the block table
    "10_compressing.ipynb": {"check_quantizer", "check_victims"},
    "11_todays_caches.ipynb": {"check_absorbed"},
    "12_cache_surgery.ipynb": {"check_cache"},  # a ring that rolls back
}


def graders_called(source: str) -> set[str]:
    """Names of the ``check_...`` functions a cell calls (``kvlib.check_cache(...)`` included)."""
    return {_dotted(call.func).split(".")[-1] for call in ast.walk(_tree(source))
            if isinstance(call, ast.Call)
            and _dotted(call.func).split(".")[-1].startswith("check_")}


def _text(outputs) -> str:
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                   for o in outputs)


@pytest.mark.parametrize("name", sorted(GRADED))
def test_every_chapter_that_teaches_a_cache_or_a_policy_grades_what_the_reader_writes(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    solutions = [nb.cells[i] for i in _solutions(nb)]
    called = set().union(*(graders_called(c.source) for c in solutions))
    assert GRADED[name] <= called, f"{name}: no solution calls {sorted(GRADED[name] - called)}"
    for cell in solutions:  # the committed run of each graded solution passed, and says so
        if graders_called(cell.source):
            assert _text(cell.outputs).strip(), f"{name}: a graded solution printed nothing"


def test_graders_called_reads_calls_only():
    src = "kvlib.check_cache(A)\ncheck_victims(f)\nx = check_thing\n%time check_me()"
    assert graders_called(src) == {"check_cache", "check_victims"}


def test_solution_problems_names_each_breach():
    cells = [nbformat.v4.new_markdown_cell("<details><summary>Solution</summary>x</details>"),
             nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("y = 2"),
             nbformat.v4.new_code_cell("class Ring(kvlib.KVCache):\n    pass\n%time f()"),
             nbformat.v4.new_code_cell("class Mine(PreallocCache): ...\nclass Other: ...\n"
                                       "kvlib.check_cache(Mine, max_len=8)"),
             nbformat.v4.new_code_cell("1 / 0")]
    cells[1].metadata["tags"] = ["solution"]
    cells[2].metadata["mystnb"] = {"code_prompt_show": "Show the solution"}
    for cell in cells[3:]:
        cell.metadata["tags"] = ["hide-cell", "solution"]
    cells[5].outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="",
                                               traceback=[])]
    problems = solution_problems(nbformat.v4.new_notebook(cells=cells))
    assert [p.split(":")[0] for p in problems] == ["cell 0", "cell 1", "cell 2", "cell 3", "cell 5"]
    assert "kvlib.check_cache(Ring, ...)" in problems[3] and "error" in problems[4]


def test_cache_classes_and_checked_names_read_the_cell():
    src = ("class A(kvlib.KVCache):\n    pass\n\n\nclass B:\n    pass\n"
           "def f():\n    class Inner(KVCache): ...\n    kvlib.check_cache(A, window=4)\n%time f()")
    assert cache_classes(src) == ["A"] and checked_names(src) == {"A"}
