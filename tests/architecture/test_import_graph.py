"""The package's import graph keeps its shape: no circles, no upward imports, and the prune and
merge operations never import each other (docs/architecture.md).

The graph is read from the source with `ast`, not by importing: every `import` and
`from ... import` of a moekit module counts, at module top, inside functions and under
`if TYPE_CHECKING:` alike (an import hidden in a function still ties the two modules together).
`from pkg import name` counts as an import of `pkg.name` when that is a module, else of `pkg`.

Floors, lowest first. A module may import modules of its own floor or of a lower one, except
where ALLOWED narrows it; `surgery/` (checkpoint level, no model) uses neither the model runtime
nor calibration data, and `calib/` stays below `runtime/`:

    0  base      `moekit/__init__.py`, `errors.py`, `units.py`, and `io/` (files, headers)
    1  families  family records, layouts, fingerprints (headers and config only)
    1  formats   quantized storage formats: logical tensors, decoding (headers and bytes only)
    2  calib     calibration data, hooks, routing maths, captures (no runtime)
    3  runtime   the engine that runs a model, whole or streamed
    3  stats     routing statistics: profile records, criteria, metrics, reports
    4  surgery   checkpoint-level expert surgery: plan, canonical experts, tensors
    5  layerfit  one MoE layer at a time on calibration captures
    6  ops       the operations (prune, merge, upcycle, ablation, profile, evaluate, inspect)
    7  cli       the command line (and `__main__`)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import moekit

PACKAGE = Path(moekit.__file__).parent

FLOORS = {"base": 0, "io": 0, "families": 1, "formats": 1, "calib": 2, "runtime": 3, "stats": 3,
          "surgery": 4, "layerfit": 5, "ops": 6, "cli": 7}
# Narrower than the floors: what each of these may import (besides itself).
ALLOWED = {
    "base": {"base"},
    "io": {"base"},
    "calib": {"base", "io", "families"},
    "runtime": {"base", "io", "families", "formats", "calib"},
    "stats": {"base", "io", "families", "calib"},
    "surgery": {"base", "io", "families", "formats", "stats"},
}
APART = ("moekit.ops.prune", "moekit.ops.merge")  # never import each other


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """{dotted name: file} of every module of the package (`pkg/__init__.py` as `pkg`)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported moekit module, line) for every import statement in the module's file."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, node.lineno


def graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """{module: {imported module: first line}} over the package."""
    known = modules(root)
    edges: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges[name] = {}
        for target, line in imports(name, path, known):
            edges[name].setdefault(target, line)
    return edges


def floor_of(module: str) -> str:
    """The floor key of a dotted module name (`moekit.ops.prune.select` -> `ops`)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("errors", "units"):
        return "base"
    return "cli" if parts[1] == "__main__" else parts[1]


def circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def upward(edges: dict[str, dict[str, int]]) -> list[str]:
    """`a -> b (line)` for every import of a higher floor, or outside ALLOWED."""
    bad = []
    for source, targets in sorted(edges.items()):
        here = floor_of(source)
        for target, line in sorted(targets.items()):
            there = floor_of(target)
            allowed = ALLOWED.get(here, {k for k, v in FLOORS.items() if v <= FLOORS[here]})
            if there != here and there not in allowed:
                bad.append(f"{source} ({here}) -> {target} ({there}), line {line}")
    return bad


def crossings(edges: dict[str, dict[str, int]]) -> list[str]:
    """`a -> b` for every import between the two APART packages."""
    def inside(module: str, package: str) -> bool:
        return module == package or module.startswith(package + ".")

    first, second = APART
    return [f"{a} -> {b}" for a, targets in sorted(edges.items()) for b in sorted(targets)
            if (inside(a, first) and inside(b, second)) or (inside(a, second) and inside(b, first))]


@pytest.fixture(scope="module")
def edges() -> dict[str, dict[str, int]]:
    return graph()


def test_every_module_has_a_floor(edges):
    assert sorted({floor_of(m) for m in edges} - set(FLOORS)) == []


def test_no_import_circles(edges):
    assert circles(edges) == []


def test_no_upward_imports(edges):
    assert upward(edges) == []


def test_prune_and_merge_never_import_each_other(edges):
    assert crossings(edges) == []


def command_imports(edges: dict[str, dict[str, int]]) -> list[str]:
    """`a -> b` where one command module (`cli/*_cmd.py`) imports another: what two commands
    share lives in cli/common, cli/progress or cli/render."""
    def command(module: str) -> bool:
        return module.startswith("moekit.cli.") and module.endswith("_cmd")

    return [f"{a} -> {b}" for a, targets in sorted(edges.items()) if command(a)
            for b in sorted(targets) if command(b) and b != a]


def test_no_command_imports_another(edges):
    assert command_imports(edges) == []
    assert command_imports({"moekit.cli.merge_cmd": {"moekit.cli.prune_cmd": 1}}) != []


def test_the_checks_see_what_they_look_for(tmp_path):
    """On a small package with one circle (in a function), one upward import and a crossing,
    each check reports it."""
    files = {
        "__init__.py": "",
        "io/__init__.py": "",
        "io/reader.py": "def f():\n    from moekit.families import layout\n",
        "families/__init__.py": "",
        "families/layout.py": "from moekit.io.reader import f\n",
        "ops/__init__.py": "",
        "ops/prune/__init__.py": "",
        "ops/prune/select.py": "from moekit.ops.merge.grouping import g\n",
        "ops/merge/__init__.py": "",
        "ops/merge/grouping.py": "from . import plan\ng = 1\n",
        "ops/merge/plan.py": "",
    }
    root = tmp_path / "moekit"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    found = graph(root)
    assert found["moekit.ops.merge.grouping"] == {"moekit.ops.merge.plan": 1}
    assert circles(found) == [["moekit.families.layout", "moekit.io.reader"]]
    assert upward(found) == ["moekit.io.reader (io) -> moekit.families.layout (families), line 2"]
    assert crossings(found) == ["moekit.ops.prune.select -> moekit.ops.merge.grouping"]
