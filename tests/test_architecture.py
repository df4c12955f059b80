"""The package's shape: imports flow one way (no cycles, function-level imports included), modules stay small,
and nothing refers to files outside the repository."""
import ast
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "harmodt_fast"
MAX_LINES = 500


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    found = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found.update({"harmodt_fast.kernels." + p.stem if p.stem != "__init__" else "harmodt_fast.kernels": p
                  for p in (ROOT / "kernels").glob("*.py")})
    return found


def resolve(name: str, known) -> str | None:
    """The module a dotted import target lands in (a name imported from a package may be its submodule)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {m: set() for m in known}
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):  # every import statement, also inside functions
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                if not target.startswith("harmodt_fast") or target == "harmodt_fast._C":  # _C: compiled, no imports
                    continue
                dep = resolve(target, known)
                if dep == "harmodt_fast" and mod != "harmodt_fast.__main__":
                    # the root's lazy exports import on attribute access: an edge the graph cannot see
                    graph[mod].add("harmodt_fast (the package root: import the defining module instead)")
                elif dep and dep != mod:
                    graph[mod].add(dep)
    return graph


def find_cycle(graph):
    color, stack = {}, []

    def visit(node):
        color[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if color.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in color:
                cycle = visit(dep)
                if cycle:
                    return cycle
        color[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in color:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    rooted = sorted(m for m, deps in graph.items() if any(d.startswith("harmodt_fast (") for d in deps))
    assert not rooted, f"modules importing the package root (lazy exports hide cycles): {rooted}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_function_level_imports():
    assert "harmodt_fast.model" in import_graph()["harmodt_fast.checkpoint"]  # imported inside a function


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_nothing_refers_to_files_outside_the_repo():
    pattern = re.compile("|".join([r"DESIGN" + r"\.md", r"\.\./" + "shared", "/" + "work/"]))
    hits = []
    for p in ROOT.rglob("*"):
        if p.is_file() and p.suffix in {".py", ".md", ".sh", ".cpp", ".h", ".toml", ".cfg"} and not any(
                part.startswith(".") or part in ("build", "reports") for part in p.relative_to(ROOT).parts):
            for n, line in enumerate(p.read_text(errors="ignore").splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{p.relative_to(ROOT)}:{n}")
    assert not hits, f"references to files outside the repository: {hits}"
