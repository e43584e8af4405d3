"""How mlxft's modules meet: no import cycles (top-level or in-function imports), no module
importing another module's `_private` name, and in-function imports only with a stated reason."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mlxft"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module, name: str, known: set[str]):
    """(imported mlxft module, names taken from it, line, inside a function?) for every import."""
    package = name if name in known and any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("mlxft"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    yield sub, [], node.lineno, node
                else:
                    yield base, [alias.name], node.lineno, node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlxft"):
                    yield alias.name, [], node.lineno, node


def in_function(tree: ast.Module) -> set[int]:
    """Line numbers of import statements inside a function or method."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    lines.add(sub.lineno)
    return lines


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, tree in mods.items():
        for target, _, _, _ in imports(tree, name, known):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name and target != "mlxft":
                edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_imported_across_modules():
    mods = modules()
    known = set(mods)
    found = []
    for name, tree in mods.items():
        for target, names, line, _ in imports(tree, name, known):
            leaf = target.rpartition(".")[2]
            private = [n for n in names if n.startswith("_")] + ([leaf] if not names and leaf.startswith("_") else [])
            if private and target != name and target not in ("mlxft._blas",):
                found.append(f"{name}:{line} imports {', '.join(private)} from {target}")
    assert not found, "\n".join(found)


def test_in_function_imports_say_why():
    """A lazy import is for a heavy optional dependency or CLI start-up speed, and says so."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text().splitlines()
        tree = ast.parse("\n".join(text))
        for line in sorted(in_function(tree)):
            first = line  # the reason may sit on the first line of a block of imports, or just above it
            while first > 1 and text[first - 2].strip().startswith(("from ", "import ")):
                first -= 1
            if not any("lazy" in text[k - 1] for k in range(max(first - 1, 1), line + 1)):
                unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text[line - 1].strip()}")
    assert not unexplained, f"{len(unexplained)} in-function imports without a reason:\n" + "\n".join(unexplained)
