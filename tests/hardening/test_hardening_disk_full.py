"""A disk that fills up while `prune`, `merge` or `upcycle` write their output: one line, exit
code 2, nothing left (no output, no staging folder); an output that cannot fit is refused
before anything is written."""

from __future__ import annotations

import errno
import hashlib
import os
from collections import namedtuple
from pathlib import Path

import pytest
from prune_support import write_synthetic_stats
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import DiskFullError
from moekit.families.layout import describe
from moekit.io import bytecopy
from moekit.io import output as output_mod
from moekit.io.output import staged_output
from moekit.io.reader import Checkpoint

RUNNER = CliRunner()
Usage = namedtuple("Usage", "total used free")


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".moekit-" in p.name or p.name == "out")


def digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, writes: int, code: int) -> list[int]:
    """Let `writes` writer calls through, then fail every later one with `code`."""
    real, calls = bytecopy.write_all, []

    def write_all(fd: int, data: bytes | memoryview, behind=None) -> None:  # noqa: ANN001
        calls.append(len(data))
        if len(calls) > writes:
            raise OSError(code, os.strerror(code))
        real(fd, data, behind)

    monkeypatch.setattr(bytecopy, "write_all", write_all)
    return calls


def command(name: str, tiny_checkpoint, tmp_path: Path) -> tuple[Path, list[str]]:
    """(input folder, CLI arguments) of one writing command into tmp_path/out."""
    out = str(tmp_path / "out")
    if name == "upcycle":
        source = tiny_checkpoint("llama")
        return source, ["upcycle", str(source), "--arch", "mixtral", "-e", "4", "-k", "2",
                        "--method", "copy", "-o", out]
    source = tiny_checkpoint("mixtral")
    if name == "convert":
        return source, ["convert", str(source), "--dtype", "bf16", "--out", out]
    layout = describe(Checkpoint(source))
    tokens = {layer.index: [float(j + 1) for j in range(layer.num_experts)]
              for layer in layout.moe_layers}
    stats = write_synthetic_stats(tmp_path / "stats", source, tokens)
    extra = ["--group", "weight"] if name == "merge" else ["--criterion", "frequency"]
    return source, [name, str(source), "--stats", str(stats), "--ratio", "0.5", *extra,
                    "--out", out]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("name", ["prune", "merge", "upcycle", "convert"])
def test_disk_full_mid_write_is_one_line_exit_2_and_leaves_nothing(name, code, tiny_checkpoint,
                                                                  tmp_path, monkeypatch):
    source, args = command(name, tiny_checkpoint, tmp_path)
    before = digest(source)
    calls = fill_disk_after(monkeypatch, 3, code)
    result = RUNNER.invoke(app, args)
    assert len(calls) > 3, "the simulated full disk was never reached"
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error")]   # besides e.g. merge's mode line
    assert errors == lines[-1:] and errors[0].startswith("error: no space left for"), lines
    assert os.strerror(code) in errors[0] and "Traceback" not in result.output
    assert leftovers(tmp_path) == [] and digest(source) == before


def test_disk_full_at_fsync_is_caught_too(tmp_path, monkeypatch):
    def no_room(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(output_mod.os, "fsync", no_room)
    with pytest.raises(DiskFullError, match="no space left for"):
        with staged_output(tmp_path / "out") as staging:
            (staging / "part").write_bytes(b"x" * 100)
    assert leftovers(tmp_path) == []


def test_other_os_errors_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(PermissionError):
        with staged_output(tmp_path / "out"):
            raise PermissionError(errno.EACCES, "denied")
    assert leftovers(tmp_path) == []


def test_an_output_larger_than_the_free_space_is_refused_before_writing(tiny_checkpoint,
                                                                         tmp_path, monkeypatch):
    _, args = command("prune", tiny_checkpoint, tmp_path)
    calls = fill_disk_after(monkeypatch, 10**9, errno.ENOSPC)  # records calls, never fails
    monkeypatch.setattr(output_mod.shutil, "disk_usage", lambda path: Usage(10**6, 0, 1000))
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "but only 1.00 KB are free" in lines[0], result.stderr
    assert " needs " in lines[0] and str(tmp_path / "out") in lines[0]
    assert calls == [] and leftovers(tmp_path) == []


def test_disk_full_on_a_side_file_is_one_line_exit_2(tiny_checkpoint, tmp_path, monkeypatch):
    from moekit.surgery.plan import PrunePlan

    def no_room(self, path: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(PrunePlan, "save", no_room)
    _, args = command("prune", tiny_checkpoint, tmp_path)
    result = RUNNER.invoke(app, [*args[:-2], "--dry-run", "--plan-out",
                                 str(tmp_path / "plan.json")])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
    assert "plan.json" in lines[0] and "Traceback" not in result.output
