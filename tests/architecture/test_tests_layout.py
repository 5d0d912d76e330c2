"""The test suite keeps its shape: test files live in unit folders (tests/prune/, tests/merge/,
...), helpers shared by several files in tests/*_support.py or tests/support.py, and no test
file imports another test file."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_files_live_in_unit_folders():
    assert sorted(p.name for p in TESTS.glob("test_*.py")) == []
    units = {p.parent.name for p in TESTS.glob("*/test_*.py")}
    assert {"prune", "merge", "runtime", "cli"} <= units


def test_no_test_file_imports_another():
    offenders = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(TESTS)}: {n}" for n in names
                          if n.split(".")[-1].startswith("test_")]
    assert offenders == []
