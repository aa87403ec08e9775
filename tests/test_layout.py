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


CLOCK_ATTRS = {"perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "process_time"}


def clock_reads(path: Path) -> list[str]:
    """Where a module reads a clock itself: ``time.perf_counter()``, ``time.time()``, ``from time
    import perf_counter``, ... (line numbers)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and (
                node.attr in CLOCK_ATTRS or (node.attr in ("time", "time_ns")
                                             and isinstance(node.value, ast.Name)
                                             and node.value.id == "time")):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            found.append(f"line {node.lineno}: from time import ...")
        elif isinstance(node, ast.Name) and node.id in CLOCK_ATTRS:
            found.append(f"line {node.lineno}: {node.id}")
    return found


def test_every_timing_goes_through_the_stopwatch():
    """CONTRIBUTING: every timing goes through ``kvlib.timing.Stopwatch`` (it syncs the device);
    no module but ``kvlib/timing.py`` reads a clock."""
    reads = {name: r for name, path in modules().items() if name != "kvlib.timing"
             if (r := clock_reads(path))}
    assert not reads, f"clocks read outside kvlib/timing.py (use Stopwatch): {reads}"
    assert clock_reads(PKG / "timing.py"), "kvlib/timing.py no longer reads a clock: update this"


def runtime_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The kvlib modules ``name`` imports when it runs: lazily inside functions too, but not under
    ``if TYPE_CHECKING:`` (annotations only) nor in a package's ``__getattr__`` (names resolved on
    first use)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            return
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(t for t in [base] + [f"{base}.{a.name}" for a in node.names]
                         if t in known)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


MODEL_CODE = ("kvlib.models", "kvlib.generate", "kvlib.evaluate", "kvlib.loading", "kvlib.state",
              "kvlib.measure", "kvlib.serving")


def test_plots_only_draw_what_they_are_given():
    """No module of ``kvlib.plots`` imports model code: ``kvlib.measure`` runs the model, a plot
    draws what it returns."""
    mods = modules()
    bad = {}
    for name, path in mods.items():
        if name == "kvlib.plots" or name.startswith("kvlib.plots."):
            hits = {m for m in runtime_imports(name, path, set(mods))
                    if any(m == c or m.startswith(c + ".") for c in MODEL_CODE)}
            if hits:
                bad[name] = sorted(hits)
    assert not bad, f"plot modules that import model code: {bad}"


def test_plots_hold_no_measurement():
    """A measurement has one home, kvlib.measure: kvlib.plots neither defines nor re-exports one."""
    import kvlib.measure
    import kvlib.plots

    shared = {n for n in kvlib.measure.__all__ if hasattr(kvlib.plots, n)}
    assert not shared, f"kvlib.plots also offers kvlib.measure's {sorted(shared)}"


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
