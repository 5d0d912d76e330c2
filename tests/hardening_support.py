"""Helpers of the hardening tests (tests/hardening/): the CLI runner, the one-line refusal
check, a folder snapshot and the merge arguments they share."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from moekit.cli.app import app

RUNNER = CliRunner()
SAMPLE = Path(__file__).parents[1] / "sample_data" / "en_docs.txt"
MERGE = ("merge", "--ratio", "0.5", "--group", "weight")


def run(*args: object):
    return RUNNER.invoke(app, [str(a) for a in args])


def one_line(result, needle: str) -> None:
    """Exit 2 with exactly one stderr line holding `needle`, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}
