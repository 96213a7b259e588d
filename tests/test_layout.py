"""The floor plan holds: imports run one way between the package's folders, and no module imports itself
back through others. The simulator stands apart (it imports nothing of the product)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT

PACKAGE = ROOT / "kraite_mp"

#: Top-level units from the top floor down; a unit may import only units below it.
#: The leaves (logs, exitcodes, backoff, messages, observers) share the ground floor.
FLOORS: list[set[str]] = [
    {"__main__"},
    {"ops"},
    {"jobs"},
    {"broker"},
    {"reconcile"},
    {"streams"},
    {"supervisor"},
    {"store"},
    {"config"},
    {"binance"},
    {"logs", "exitcodes", "backoff", "messages", "observers", "metrics", "wakeup"},
]

pytestmark = pytest.mark.unit


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path) -> Iterator[str]:
    """Every kraite_mp module this file imports when it runs (function-level too; TYPE_CHECKING not)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kraite_mp"):
            if node.module == "kraite_mp" or all(
                (PACKAGE.parent / (node.module.replace(".", "/") + f"/{a.name}.py")).exists()
                for a in node.names
            ):
                yield from (f"{node.module}.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("kraite_mp"))


def _product_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "simulator" not in p.parts}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _floor(unit: str) -> int:
    for index, floor in enumerate(FLOORS):
        if unit in floor:
            return index
    raise AssertionError(f"{unit} is on no floor of FLOORS: add it where it belongs")


def test_imports_run_downhill_between_folders() -> None:
    upward = []
    for module, path in _product_modules().items():
        for target in _runtime_imports(path):
            src, dst = _unit(module), _unit(target)
            if src != dst and dst != "kraite_mp" and _floor(dst) <= _floor(src):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that run up or sideways between folders: " + ", ".join(sorted(upward))


def test_no_import_cycle() -> None:
    modules = _product_modules()
    graph = {m: {t for t in _runtime_imports(p) if t in modules and t != m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_simulator_imports_nothing_of_the_product() -> None:
    leaks = [
        f"{_module_name(p)} -> {t}"
        for p in (PACKAGE / "simulator").rglob("*.py")
        for t in _runtime_imports(p)
        if not t.startswith("kraite_mp.simulator")
    ]
    assert not leaks, leaks


def test_the_worker_loads_no_websocket_code() -> None:
    probe = (
        "import sys, kraite_mp.jobs; print(sorted(m for m in sys.modules if m.split('.')[0] == 'websocket'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


#: The longest a product module may grow: past it, a module holds more than one responsibility here.
MAX_MODULE_LINES = 500


def test_no_product_module_is_over_the_line_limit() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in _product_modules().items()}
    over = sorted(f"{m} ({n} lines)" for m, n in sizes.items() if n > MAX_MODULE_LINES)
    assert not over, f"product modules over {MAX_MODULE_LINES} lines: " + ", ".join(over)
