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


# ---- docs/architecture.md's recipes stay true -------------------------------------------------------------------
# ops tested in a file named after another op or their module (everything else: tests/test_<op>.py)
TESTED_WITH = {"harmony_rows": "test_harmony_update.py", "pack_masks": "test_packing.py",
               "unpack_masks": "test_packing.py"}


def test_every_registered_op_has_its_test_file():
    import harmodt_fast.ops  # noqa: F401  (registers every op)
    from harmodt_fast.ops import _dispatch

    missing = {op: TESTED_WITH.get(op, f"test_{op}.py") for op in _dispatch._registry
               if not (ROOT / "tests" / TESTED_WITH.get(op, f"test_{op}.py")).is_file()}
    assert not missing, f"registered ops without their test file: {missing}"


def _recipe_sections() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    parts = re.split(r"^(#+ .*)$", text, flags=re.M)
    return "\n".join(body for head, body in zip(parts[1::2], parts[2::2]) if "Adding" in head)


def test_the_recipes_name_files_and_names_that_exist():
    recipes = _recipe_sections()
    assert "Adding an op" in (ROOT / "docs" / "architecture.md").read_text() and recipes
    source = "\n".join(p.read_text() for d in ("harmodt_fast", "kernels", "csrc", "benchmarks", "tests")
                       for p in (ROOT / d).rglob("*") if p.suffix in {".py", ".cpp", ".h"})
    bad = []
    for token in re.findall(r"`([^`]+)`", recipes):
        token = token.split("(")[0].strip()
        if "<" in token or " " in token:  # a pattern (`tests/test_<op>.py`) or a command
            continue
        if "/" in token or token.endswith((".py", ".cpp", ".md")):
            path = token.split("::")[0]
            if not any((base / path).exists() for base in (ROOT, PACKAGE)):
                bad.append(token)
            elif "::" in token and f"def {token.split('::')[1]}(" not in (ROOT / path).read_text():
                bad.append(token)
        elif re.fullmatch(r"[A-Za-z_][\w.]*", token) and "_" in token or re.fullmatch(r"[A-Z][a-z]+[A-Z]\w*", token):
            name = token.rsplit(".", 1)[-1]
            if not re.search(rf"(def |class |^|\s){re.escape(name)}\b", source, flags=re.M):
                bad.append(token)
    assert not bad, f"docs/architecture.md's recipes name what does not exist: {bad}"
