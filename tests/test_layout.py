"""The shape of kvlib stays readable: small modules, short functions, imports that run one way,
and a README whose layout table matches the tree."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kvlib"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # from the ``def`` line to the function's last line, docstring included


def modules() -> dict[str, Path]:
    """``{"kvlib.bench.report": path, ...}`` for every module of the package."""
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def test_no_module_is_too_long():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_too_long():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The kvlib modules that ``name`` imports, lazily inside functions too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        found |= {t for t in targets if t in known and t != name}
    return found


def test_imports_run_one_way():
    """No cycle among kvlib's modules (the package root, which only re-exports, excluded)."""
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) - {"kvlib"} for name, path in mods.items()
             if name != "kvlib"}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_readme_layout_table_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1]
    named = set(re.findall(r"`(kvlib/[\w/]+(?:\.py)?/?)`", table))
    for entry in named:
        assert (ROOT / entry).exists(), f"README's layout names {entry}, which does not exist"
    for path in PKG.iterdir():
        if path.name.startswith("_") or path.name == "__pycache__":
            continue
        entry = f"kvlib/{path.name}" + ("/" if path.is_dir() else "")
        assert entry in named, f"README's layout table does not name {entry}"


# ---- the import table in CONTRIBUTING.md -----------------------------------------------------

ROOT_PART = "the package's version"  # a part that may import ``kvlib`` itself (its __version__)


def part_of(module: str) -> str:
    """``kvlib.caches.base`` -> ``caches``; the package root is ``kvlib``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kvlib"


def import_table(text: str) -> dict[str, set[str]]:
    """CONTRIBUTING's table: each part -> the parts it may import (``kvlib`` for the root)."""
    table = text.split("<!-- import-table", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    every = {p for left, _ in rows for p in re.findall(r"`(\w+)`", left)}
    allowed = {}
    for left, right in rows:
        names = set(re.findall(r"`(\w+)`", right))
        if right.strip().startswith("anything but"):
            names = every - names
        if ROOT_PART in right:
            names.add("kvlib")
        for part in re.findall(r"`(\w+)`", left):
            allowed[part] = names
    return allowed


def test_the_import_table_parses():
    allowed = import_table((ROOT / "CONTRIBUTING.md").read_text())
    assert allowed["caches"] == {"rotary"} and allowed["rotary"] == set()
    assert "train" not in allowed["bench"] and "models" in allowed["bench"]
    assert allowed["machine"] == {"kvlib"}


def test_imports_follow_the_table_in_contributing():
    allowed = import_table((ROOT / "CONTRIBUTING.md").read_text())
    mods = modules()
    parts = {part_of(name) for name in mods} - {"kvlib"}
    assert parts <= set(allowed), (f"parts of kvlib missing from CONTRIBUTING's import table: "
                                   f"{sorted(parts - set(allowed))}")
    wrong = []
    for name, path in mods.items():
        me = part_of(name)
        if me == "kvlib":
            continue
        for target in imports_of(name, path, set(mods)):
            other = part_of(target)
            if other != me and other not in allowed[me]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against CONTRIBUTING's table:\n  " + "\n  ".join(sorted(wrong))


def test_notebooks_never_import_bench():
    import nbformat

    found = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code" and re.search(r"kvlib\.bench\b|from kvlib import bench",
                                                      cell.source):
                found.append(f"{path.name} cell {i}")
    assert not found, f"chapters import kvlib.bench (use kvlib.measure): {found}"
