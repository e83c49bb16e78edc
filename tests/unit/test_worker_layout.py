"""worker/ by concern (issue 27): its subpackages import each other in one direction only, no module of
worker/ takes part in an import circle, and each subpackage imports in a fresh interpreter on its own.

Every import counts, a function's own too (a lazy import hides a circle; it does not remove it).
"""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "worker"
# Each subpackage may import only those before it (worker/__init__.py); the top-level modules
# (__main__, main, job) compose them and no subpackage imports those.
ORDER = ("lifecycle", "voice", "pair", "simulator")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(WORKER.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The worker modules ``name`` imports (a package's ``__init__`` when only the package is named)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from worker.voice import speech``: the module worker.voice.speech, else the package
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import worker.voice.speech.x``: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def unit(module: str) -> str:
    """The subpackage a module belongs to, or ``worker`` for the top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ORDER) else "worker"


def test_every_subpackage_is_in_the_order() -> None:
    found = {p.parent.name for p in WORKER.glob("*/__init__.py")}
    assert found == set(ORDER), f"add a new subpackage to ORDER (and worker/__init__.py): {found - set(ORDER)}"


def test_no_module_of_worker_is_in_an_import_circle() -> None:
    try:
        list(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle: {' -> '.join(exc.args[1])}")


def test_subpackages_import_only_those_before_them() -> None:
    edges = {(unit(a), unit(b)) for a, deps in GRAPH.items() for b in deps if unit(a) != unit(b)}
    wrong = sorted(
        (a, b, [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps if (unit(m), unit(d)) == (a, b)])
        for a, b in edges
        if a != "worker" and (b == "worker" or ORDER.index(b) > ORDER.index(a))
    )
    assert not wrong, f"imports against the order {ORDER}: {wrong}"
    # the graph between subpackages is then acyclic: ORDER is a topological order of it
    units = {u: {b for a, b in edges if a == u} for u in ORDER}
    list(graphlib.TopologicalSorter(units).static_order())


@pytest.mark.parametrize("package", ORDER)
def test_a_subpackage_imports_alone(package: str) -> None:
    """Every module of one subpackage imported in a fresh interpreter loads no worker module of a
    subpackage after it, nor any top-level one."""
    mine = sorted(m for m in MODULES if unit(m) == package)
    code = (f"import importlib, json, sys\nfor m in {mine!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(n for n in sys.modules if n == 'worker' or n.startswith('worker.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    allowed = set(ORDER[: ORDER.index(package) + 1])
    beyond = [m for m in loaded if m != "worker" and unit(m) not in allowed]
    assert not beyond, f"importing worker.{package} loaded {beyond}"
