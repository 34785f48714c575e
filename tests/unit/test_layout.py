"""The shape of the package: short functions, no import cycles, every module importable alone.

These guard the layout described in docs/architecture.md: a function a newcomer has to
read whole stays short, and the import graph stays a tree a reader can follow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "memsurgery"
MAX_FUNCTION_LINES = 80
# Functions allowed past the limit ("memsurgery/file.py name": why it cannot be split well).
ALLOWED_LONG: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    """{dotted module name: file} for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def function_lengths() -> list[tuple[int, str, int]]:
    """(lines from `def` to the end of the body, "file name", line) for every function, longest first.

    Docstrings and comments count: a function is as long as what a reader scrolls through."""
    rows = []
    for path in _modules().values():
        rel = path.relative_to(PACKAGE.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{rel} {node.name}", node.lineno))
    return sorted(rows, reverse=True)


def test_no_function_is_longer_than_the_limit():
    long = [f"{where} (line {line}): {n} lines" for n, where, line in function_lengths()
            if n > MAX_FUNCTION_LINES and where not in ALLOWED_LONG]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines; split them into named steps: {long}"



def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its file (module level or lazily)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    # The root package runs before any of its modules anyway, so an edge to it (to read
    # __version__) adds nothing to the order in which modules execute.
    return {m for m in found if m in modules and m not in (name, PACKAGE.name)}


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module in the package's import graph."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    # Lazy (function-level) imports count too: a cycle through one is still a cycle a
    # reader has to untangle, and it breaks as soon as someone hoists the import.
    assert import_cycles() == []


def _memsurgery_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names taken from it) of every absolute `memsurgery...` import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.lineno, node.module, [a.name for a in node.names if a.name != "*"]))
    return [f for f in found if f[1] == PACKAGE.name or f[1].startswith(PACKAGE.name + ".")]


def _top_level_names(path: Path) -> set[str] | None:
    """Names a module defines at top level (also inside top-level if/try); None when it has a
    module `__getattr__` (any name may resolve)."""
    names: set[str] = set()
    todo = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "handlers", []) + getattr(node, "finalbody", [])
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body
    return None if "__getattr__" in names else names


def test_every_import_names_something_that_exists():
    """A lazy import of something that has moved fails only when its function runs: catch it here.

    Every `import memsurgery.x` / `from memsurgery.x import y` in the package and the tests
    must name a module x, and y must be a submodule of x or a name x defines."""
    modules = _modules()
    files = sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "tests").rglob("*.py"))
    stale = []
    for path in files:
        for line, module, names in _memsurgery_imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if module not in modules:
                stale.append(f"{where} {module}")
                continue
            defined = _top_level_names(modules[module])
            stale += [f"{where} {module}.{n}" for n in names
                      if f"{module}.{n}" not in modules and defined is not None and n not in defined]
    assert not stale, f"imports of modules or names that do not exist: {stale}"


_IMPORT_EACH = r"""
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "memsurgery" or m.startswith("memsurgery.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{name}: {type(err).__name__}: {err}")
print("\n".join(failed))
"""


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process where no other memsurgery module is loaded yet."""
    names = [n for n in _modules() if n != "memsurgery.__main__"]
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", proc.stdout


if __name__ == "__main__":  # python tests/unit/test_layout.py: the longest functions
    for n, where, line in function_lengths()[:20]:
        print(f"{n:5d}  {where} (line {line})")
