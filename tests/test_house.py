"""The house rules, checked on the source (no import is executed):

- the packages depend one way: specs <- steps <- providers <- manager. ``specs`` imports none of
  the others; ``steps`` imports only ``specs``; ``providers`` imports ``specs`` and the stdlib-only
  contract modules of ``steps`` (``CONTRACTS``); ``manager`` may import all;
- no import cycle between modules, counting imports made inside functions (a lazy import hides a
  cycle from Python, not from a reader);
- ``manager`` imports no heavy library at module level, so the CLI starts in a blink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("specs", "steps", "providers", "manager")
#: What each package may import of the others.
ALLOWED = {"specs": set(), "steps": {"specs"}, "providers": {"specs", "steps"},
           "manager": {"specs", "steps", "providers"}}
#: The modules of ``steps`` that ``providers`` may use: stdlib-only contracts of the workload.
CONTRACTS = {"optjob.steps.layout", "optjob.steps.events", "optjob.steps.exit_codes"}
HEAVY = ("torch", "transformers", "sky", "boto3", "botocore", "optuna", "peft", "numpy", "mlflow", "google",
         "azure")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["optjob", *parts])


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import the file makes at run time
    (``if TYPE_CHECKING:`` blocks import nothing)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    top_level = {id(node) for node in tree.body}
    out: list[tuple[str, int, bool]] = []

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    def walk(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_top = top and id(child) in top_level
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.append((alias.name, child.lineno, child_top))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    stem = ".".join(base + ([child.module] if child.module else []))
                else:
                    stem = child.module or ""
                for alias in child.names:
                    full = f"{stem}.{alias.name}"
                    out.append((full if full in known else stem, child.lineno, child_top))
            else:
                walk(child, child_top)

    walk(tree, True)
    resolved = []
    for target, line, top in out:
        if target.startswith("optjob."):
            mod = resolve(target)
            if mod and mod != name:
                resolved.append((mod, line, top))
        else:
            resolved.append((target, line, top))
    return resolved


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {t for t, _, _ in imports(name, path, known) if t in known} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def package_of(module: str) -> str:
    return module.split(".")[1]


def test_no_import_cycle_between_modules() -> None:
    assert cycles(graph()) == []


def test_cycle_detector_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package: str) -> None:
    mods = modules()
    known = set(mods)
    wrong = []
    for name, path in mods.items():
        if package_of(name) != package:
            continue
        for target, line, _ in imports(name, path, known):
            if not target.startswith("optjob.") or package_of(target) == package:
                continue
            other = package_of(target)
            if other not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {target}")
            elif package == "providers" and other == "steps" and target not in CONTRACTS:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {target} (only {sorted(CONTRACTS)})")
    assert wrong == []


def test_manager_imports_no_heavy_library_at_module_level() -> None:
    mods = modules()
    known = set(mods)
    wrong = []
    for name, path in mods.items():
        if package_of(name) != "manager":
            continue
        for target, line, top in imports(name, path, known):
            if top and target.split(".")[0] in HEAVY:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert wrong == []
