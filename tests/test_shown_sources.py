"""The chapters show kvlib's real source (``kvlib.show_source``): every committed output of a
``show_source(...)`` cell is the source as it is now, so a change to a shown function is caught
here, in a second, before nbval re-executes the chapter."""

import ast
import inspect
import json
from pathlib import Path

import pytest

import kvlib

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _namespace(cells: list[dict]) -> dict:
    """``kvlib`` and every name the notebook imports (its import statements, run here)."""
    ns = {"kvlib": kvlib}
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        try:
            tree = ast.parse("".join(line for line in cell["source"]
                                     if not line.lstrip().startswith(("%", "!"))))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                exec(compile(ast.Module([node], []), "<imports>", "exec"), ns)
    return ns


def _shown(nb: Path):
    cells = json.loads(nb.read_text())["cells"]
    ns = _namespace(cells)
    for i, cell in enumerate(cells):
        src = "".join(cell["source"]) if cell["cell_type"] == "code" else ""
        calls = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call) and "show_source"
                 in (getattr(n.func, "id", None), getattr(n.func, "attr", None))
                 ] if "show_source(" in src else []
        if len(calls) != 1:
            continue
        texts = ["".join(o.get("data", {}).get("text/markdown", ""))
                 for o in cell.get("outputs", []) if "data" in o]
        yield i, ast.unparse(calls[0].args[0]), ns, texts


CASES = [(nb.name, i, expr, ns, texts) for nb in NOTEBOOKS for i, expr, ns, texts in _shown(nb)]


@pytest.mark.parametrize("notebook,cell,expr,ns,texts", CASES,
                         ids=[f"{c[0]}:{c[1]}:{c[2]}" for c in CASES])
def test_a_shown_source_is_the_source_today(notebook, cell, expr, ns, texts):
    source = inspect.getsource(eval(expr, ns))
    assert texts, f"{notebook} cell {cell}: show_source({expr}) has no committed output"
    assert texts[0] == f"```python\n{source}```", (
        f"{notebook} cell {cell} shows {expr} as it was: re-execute the chapter "
        "(jupyter nbconvert --execute --inplace) after changing it")
