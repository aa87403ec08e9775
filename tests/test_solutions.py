"""Every exercise solution in the chapters runs, and every cache a solution writes passes
``kvlib.check_cache``.

The convention (also in CONTRIBUTING.md):

- A solution is a code cell tagged ``solution`` and ``hide-cell`` (the book folds it under "Show
  the solution"), right after the exercise. Solutions are never markdown (``<details>``): markdown
  is never run.
- Every class a solution defines at top level that subclasses ``kvlib.KVCache`` is passed through
  ``kvlib.check_cache``, with the keyword arguments in the cell's metadata ``kvlib.check_cache``
  (for example ``{"max_len": 64}`` or ``{"window": 8}``); without them ``check_cache`` builds the
  class with no arguments, or with its defaults for ``max_len=`` / ``window=`` when ``__init__``
  asks for them. A solution that defines no cache only has to run without error.
- A solution may use anything the cells above it define: the test runs the notebook in a kernel,
  as the book does, from the top to its last solution, and checks each solution's caches right after
  it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("notebooks/*.ipynb"))
CHECK_KWARGS = {"max_len", "window"}  # what check_cache accepts besides the class
_MARK = "solution-checked"


def _solutions(nb) -> list[int]:
    return [i for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and "solution" in c.metadata.get("tags", [])]


def _check_kwargs(cell) -> dict:
    return cell.metadata.get("kvlib", {}).get("check_cache", {})


def _classes(source: str) -> list[str]:
    """Names of the classes a cell defines at top level (IPython magics blanked out first)."""
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.split("\n"))
    return [node.name for node in ast.parse(code).body if isinstance(node, ast.ClassDef)]


def check_cell(index: int, cell) -> nbformat.NotebookNode:
    """The cell run after solution ``index``: check_cache on each KVCache class it defined."""
    kwargs = _check_kwargs(cell)
    return nbformat.v4.new_code_cell(
        "import kvlib as _kvlib\n"
        f"for _name in {_classes(cell.source)!r}:\n"
        "    _cls = globals()[_name]\n"
        "    if isinstance(_cls, type) and issubclass(_cls, _kvlib.KVCache):\n"
        f"        _passed = _kvlib.check_cache(_cls, verbose=False, **{kwargs!r})\n"
        f"        print('{_MARK}', {index}, _name, len(_passed))\n")


def with_checks(nb) -> tuple[nbformat.NotebookNode, dict[int, int]]:
    """The notebook up to its last solution, a check cell after each solution; and, for each
    solution, the index of its check cell in the new notebook."""
    cells, checks = [], {}
    for i, cell in enumerate(nb.cells[: max(_solutions(nb)) + 1]):
        cells.append(cell)
        if i in _solutions(nb):
            cells.append(check_cell(i, cell))
            checks[i] = len(cells) - 1
    out = nbformat.v4.new_notebook(cells=cells, metadata=nb.metadata)
    return out, checks


def _checked(cell) -> list[tuple[int, str, int]]:
    text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")
    return [(int(i), name, int(n))
            for i, name, n in re.findall(rf"^{_MARK} (\d+) (\w+) (\d+)$", text, re.M)]


WITH_SOLUTIONS = [p for p in NOTEBOOKS if _solutions(nbformat.read(p, as_version=4))]


def solution_problems(nb) -> list[str]:
    """What breaks the convention in a notebook: solutions in markdown, solution cells not hidden
    or with bad check_cache arguments, cells shown as solutions but not tagged."""
    problems = []
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags", [])
        prompt = cell.metadata.get("mystnb", {}).get("code_prompt_show", "")
        kwargs = _check_kwargs(cell)
        if cell.cell_type == "markdown":
            if re.search(r"<summary>\s*Solution", cell.source):
                problems.append(f"cell {i}: a solution in markdown (<details>), which nothing runs")
        elif "solution" in tags:
            if "hide-cell" not in tags:
                problems.append(f"cell {i}: a solution not tagged hide-cell")
            if not set(kwargs) <= CHECK_KWARGS:
                problems.append(f"cell {i}: kvlib.check_cache metadata takes only "
                                f"{sorted(CHECK_KWARGS)}, not {sorted(kwargs)}")
            if kwargs and not _classes(cell.source):
                problems.append(f"cell {i}: check_cache arguments, but the cell defines no class")
        elif "solution" in prompt.lower():
            problems.append(f"cell {i}: shown as a solution but not tagged solution")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solutions_are_tagged_code_cells_never_markdown(path):
    problems = solution_problems(nbformat.read(path, as_version=4))
    assert not problems, (f"{path.name} (convention: tests/test_solutions.py):\n  "
                          + "\n  ".join(problems))


def test_solution_problems_names_each_breach():
    cells = [nbformat.v4.new_markdown_cell("<details><summary>Solution</summary>x</details>"),
             nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("y = 2"),
             nbformat.v4.new_code_cell("z = 3"), nbformat.v4.new_code_cell("class C: ...")]
    cells[1].metadata["tags"] = ["solution"]
    cells[1].metadata["kvlib"] = {"check_cache": {"max_len": 8}}
    cells[2].metadata["mystnb"] = {"code_prompt_show": "Show the solution"}
    cells[3].metadata["tags"] = ["hide-cell", "solution"]
    cells[4].metadata["tags"] = ["hide-cell", "solution"]
    cells[4].metadata["kvlib"] = {"check_cache": {"max_len": 8, "windw": 4}}
    problems = solution_problems(nbformat.v4.new_notebook(cells=cells))
    assert [p.split(":")[0] for p in problems] == ["cell 0", "cell 1", "cell 1", "cell 2", "cell 4"]
    assert "'windw'" in problems[-1] and "no class" in problems[2]


def test_check_cell_checks_each_class_a_solution_defines():
    cell = nbformat.v4.new_code_cell("class A(kvlib.KVCache):\n    pass\n\n\nclass B:\n    pass\n"
                                     "def f():\n    class Inner: ...\n%time f()")
    cell.metadata["kvlib"] = {"check_cache": {"window": 4}}
    src = check_cell(7, cell).source
    assert "for _name in ['A', 'B']:" in src
    assert "check_cache(_cls, verbose=False, **{'window': 4})" in src
    assert f"print('{_MARK}', 7, _name, len(_passed))" in src


def test_with_checks_stops_at_the_last_solution():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("class C: ..."),
                                         nbformat.v4.new_markdown_cell("after")])
    nb.cells[1].metadata["tags"] = ["hide-cell", "solution"]
    out, checks = with_checks(nb)
    assert [c.source for c in out.cells][:2] == ["x = 1", "class C: ..."]
    assert len(out.cells) == 3 and checks == {1: 2}


def run_solutions(nb, cwd: Path) -> list[tuple[int, str, int]]:
    """Run ``nb`` (a notebook with solutions) to its last solution in a kernel, checking each
    solution's caches after it; (solution cell, class, checks passed) for every cache checked.
    Raises nbclient's CellExecutionError at the first cell that fails, check_cache's hint in it."""
    from nbclient import NotebookClient

    run, checks = with_checks(nb)
    NotebookClient(run, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    done = []
    for solution, check in checks.items():
        found = _checked(run.cells[check])
        assert {name for _, name, _ in found} <= set(_classes(nb.cells[solution].source))
        assert found or not _check_kwargs(nb.cells[solution]), (
            f"cell {solution} has check_cache arguments but defines no KVCache subclass")
        done += found
    return done


@pytest.mark.parametrize("path", WITH_SOLUTIONS, ids=lambda p: p.name)
def test_every_solution_runs_and_its_caches_pass_check_cache(path):
    from nbclient.exceptions import CellExecutionError

    try:
        run_solutions(nbformat.read(path, as_version=4), path.parent)
    except CellExecutionError as err:  # names the cell; check_cache's hint is in the message
        pytest.fail(f"{path.name}: {err}", pytrace=False)


def test_run_solutions_checks_caches_and_fails_on_a_broken_one(tmp_path):
    from nbclient.exceptions import CellExecutionError

    def solution(src, **kwargs):
        cell = nbformat.v4.new_code_cell(src)
        cell.metadata["tags"] = ["hide-cell", "solution"]
        if kwargs:
            cell.metadata["kvlib"] = {"check_cache": kwargs}
        return cell

    good = [nbformat.v4.new_code_cell("import kvlib"),
            solution("class Mine(kvlib.PreallocCache):\n    pass", max_len=32),
            solution("answer = 6 * 7")]
    nb = nbformat.v4.new_notebook(cells=good)
    assert run_solutions(nb, tmp_path) == [(1, "Mine", 7)]
    broken = solution("class OnlyNew(kvlib.ConcatCache):\n"
                      "    def update(self, keys, values):\n"
                      "        super().update(keys, values)\n"
                      "        return keys, values")
    nb = nbformat.v4.new_notebook(cells=[*good, broken])
    with pytest.raises(CellExecutionError, match="did update return the stored keys"):
        run_solutions(nb, tmp_path)
