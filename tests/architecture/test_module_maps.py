"""The maps of the code stay true: a package docstring that lists its modules lists all of
them (and no module that is gone), and the README's layout block names every subpackage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "moekit"
MAPPED = [p.parent for p in sorted(PACKAGE.rglob("__init__.py")) if "__pycache__" not in str(p)]


def _listed(doc: str, names: set[str]) -> set[str]:
    """Module names a docstring mentions as `name.py`, or as a bare word starting a line."""
    dotted = set(re.findall(r"\b([a-z_][a-z0-9_]*)\.py\b", doc))
    leading = {m for m in re.findall(r"^\s+([a-z_][a-z0-9_]*)\s", doc, re.M) if m in names}
    return dotted | leading


@pytest.mark.parametrize("package", MAPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_map_names_every_module(package: Path):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    listed = _listed(doc, modules)
    if not listed & modules:
        pytest.skip("no module map in this package's docstring")
    assert modules - listed == set(), "modules missing from the map"
    stale = {m for m in re.findall(r"\b([a-z_][a-z0-9_]*)\.py\b", doc)} - modules
    assert stale == set(), "the map names modules that do not exist"


def test_readme_layout_block_names_every_subpackage():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"^moekit/([a-z_]+)/", readme, re.M))
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert named == packages
