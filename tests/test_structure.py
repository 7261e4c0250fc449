"""The house rules, read from the source with ast (nothing here imports refseg).

- no import cycle between modules inside refseg/ (module-level and function-level imports alike);
- no module inside refseg/ over 400 lines;
- no private name (``_x``) imported from another module, in refseg/, tests/, bench/, jobs/;
- models/, losses, metrics and config never import ray.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "refseg"
MAX_LINES = 400
RAY_FREE = ("refseg.models", "refseg.losses", "refseg.metrics", "refseg.config")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(path: Path, name: str) -> list[tuple[str, str | None, int]]:
    """Every import in the file as (module, imported name or None, line); relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if is_package(path) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def internal_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the refseg modules it imports (``from pkg import sub`` counts as importing pkg.sub)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for module, imported, _ in imports_of(path, name):
            if not module.startswith("refseg"):
                continue
            target = f"{module}.{imported}" if imported and f"{module}.{imported}" in modules else module
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target != name and not name.startswith(target + "."):  # a parent package runs first anyway
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
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_refseg():
    cycle = find_cycle(internal_edges(package_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_over_400_lines():
    long = {name: n for name, path in package_modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("folder", ["refseg", "tests", "bench", "jobs"])
def test_no_private_name_imported_from_another_module(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        name = module_name(path)
        for module, imported, line in imports_of(path, name):
            if module.startswith("refseg") and imported and imported.startswith("_") and imported != "__version__":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {imported} from {module}")
            if module.startswith("refseg") and any(part.startswith("_") and part != "__init__"
                                                   for part in module.split(".")):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the private module {module}")
    assert not bad, "\n".join(bad)


def test_models_losses_metrics_config_never_import_ray():
    bad = []
    for name, path in package_modules().items():
        if not any(name == top or name.startswith(top + ".") for top in RAY_FREE):
            continue
        for module, _, line in imports_of(path, name):
            if module == "ray" or module.startswith("ray."):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)
