"""Issue #11, defects 2-5, 8, 10, 11: signals leave nothing, two runs into one --out cannot
both win, `--out .` and side files inside the input are refused before any work, aux files
never come through links out of the folder, files are fsynced before the rename, and the
kernel copy writes exactly the bytes of the user-space copy."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import OutputExistsError
from moekit.io import bytecopy
from moekit.io import output as output_mod
from moekit.io.output import copy_aux_files, staged_output
from moekit.io.reader import Checkpoint
from moekit.io.writer import OutTensor, write_checkpoint

RUNNER = CliRunner()


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".moekit-" in p.name)


def drop_list(tmp_path: Path) -> Path:
    path = tmp_path / "drop.txt"
    path.write_text("0: 0 1\n1: 0 1\n")
    return path


# ---- 2: SIGTERM / SIGHUP mid-write --------------------------------------------------------

# Runs `moekit prune`, sending itself SIGNAL right after the first tensor is written.
SELF_KILL = """
import os, signal, sys
from moekit.io import writer
real = writer._copy_range
def copy_then_signal(fd, info, behind=None):
    real(fd, info, behind)
    os.kill(os.getpid(), signal.{sig})
writer._copy_range = copy_then_signal
from moekit.cli.app import main
sys.argv = ["moekit", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_signal_mid_write_cleans_up_with_one_line(sig, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-c", SELF_KILL.format(sig=sig), "prune", str(tiny_checkpoint("mixtral")),
         "--drop", str(drop_list(tmp_path)), "--out", str(out)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 128 + getattr(signal, sig), run.stderr
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and sig in lines[0], run.stderr
    assert not out.exists() and hidden(tmp_path) == []


def test_staged_output_turns_sigterm_into_cleanup(tmp_path):
    def not_handled(signum, frame):
        raise AssertionError("SIGTERM reached the previous handler: staged_output ignored it")

    out = tmp_path / "out"
    previous = signal.signal(signal.SIGTERM, not_handled)  # never let the test runner die
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            with staged_output(out) as staging:
                (staging / "part").write_bytes(b"x" * 1000)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler interrupts this
        assert caught.value.signum == signal.SIGTERM
        assert not out.exists() and hidden(tmp_path) == []
        assert signal.getsignal(signal.SIGTERM) is not_handled  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- 3: two runs into one --out -----------------------------------------------------------

def test_second_writer_never_replaces_the_first(tmp_path):
    """Both runs passed the early check; the one that finishes second fails and leaves
    nothing; the first run's output stays."""
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="another process"):
        with staged_output(out) as staging:
            (staging / "mine").write_text("loser")
            with staged_output(out) as other:  # the other run finishes first
                (other / "theirs").write_text("winner")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert hidden(tmp_path) == []


def test_two_cli_runs_exactly_one_wins(tiny_checkpoint, tmp_path):
    src, out = tiny_checkpoint("mixtral"), tmp_path / "out"
    args = [sys.executable, "-c", "from moekit.cli.app import main; main()", "prune", str(src),
            "--drop", str(drop_list(tmp_path)), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "error:" in loser
    assert Checkpoint(out).tensors and hidden(tmp_path) == []


# ---- 4: --out . ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".", "..", "sub/.."])
def test_out_dot_is_refused_before_any_work(name, tiny_checkpoint, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work / "sub" if name == ".." else work)
    result = RUNNER.invoke(app, ["prune", str(tiny_checkpoint("mixtral")), "--drop",
                                 str(drop_list(tmp_path)), "--out", name, "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "current folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (work / "keep.txt").read_text() == "mine" and hidden(tmp_path) == []


# ---- 5: side files inside the input, bad extensions before the work -------------------------

def _protected_copy(tiny_checkpoint, tmp_path: Path) -> tuple[Path, bytes]:
    src = shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "model")
    return src, (src / "config.json").read_bytes()


@pytest.mark.parametrize("option", ["--plan-out", "--export"])
def test_prune_side_files_inside_the_input_are_refused(option, tiny_checkpoint, tmp_path):
    src, config = _protected_copy(tiny_checkpoint, tmp_path)
    result = RUNNER.invoke(app, ["prune", str(src), "--drop", str(drop_list(tmp_path)),
                                 "--dry-run", option, str(src / "config.json")])
    assert result.exit_code == 2 and "inside the input" in result.stderr, result.output
    assert (src / "config.json").read_bytes() == config


def test_eval_export_extension_checked_before_the_work(tiny_checkpoint, tmp_path, monkeypatch):
    import moekit.runtime.engine as engine

    monkeypatch.setattr(engine, "open_model", lambda *a, **k: pytest.fail("model loaded"))
    result = RUNNER.invoke(app, ["eval", str(tiny_checkpoint("mixtral")), "--export",
                                 str(tmp_path / "x.txt")])
    assert result.exit_code == 2 and "'.txt'" in result.stderr, result.output


@pytest.mark.parametrize("option", ["--export", "--export-coldest"])
def test_profile_exports_checked_before_the_work(option, tiny_checkpoint, tmp_path, monkeypatch):
    import moekit.runtime.engine as engine

    monkeypatch.setattr(engine, "open_model", lambda *a, **k: pytest.fail("model loaded"))
    src, config = _protected_copy(tiny_checkpoint, tmp_path)
    for target, needle in [(tmp_path / "t.txt", "'.txt'"), (src / "t.csv", "inside the input")]:
        result = RUNNER.invoke(app, ["profile", str(src), "--out", str(tmp_path / "prof"),
                                     option, str(target)])
        assert result.exit_code == 2 and needle in result.stderr, result.output
        assert not (tmp_path / "prof").exists()


def test_inspect_export_inside_the_input_is_refused(tiny_checkpoint, tmp_path):
    src, config = _protected_copy(tiny_checkpoint, tmp_path)
    result = RUNNER.invoke(app, ["inspect", str(src), "--export", str(src / "facts.json")])
    assert result.exit_code == 2 and "inside the input" in result.stderr
    assert not (src / "facts.json").exists()


# ---- 8: aux files ---------------------------------------------------------------------------

def test_aux_files_are_checkpoint_files_never_links_out(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    (src / "notes.txt").write_text("not a checkpoint file")
    (src / "modeling_evil.py").write_text("import os")
    (src / "merges.txt").symlink_to(secret)  # a link that leaves the folder
    (src / "vocab.json").symlink_to(src / "tokenizer.json")  # a link inside: fine
    (src / "LICENSE").mkdir()  # not a regular file
    assert copy_aux_files(src, dst) == ["generation_config.json", "tokenizer.json", "vocab.json"]
    assert sorted(p.name for p in dst.iterdir()) == ["generation_config.json", "tokenizer.json",
                                                     "vocab.json"]
    assert not (dst / "vocab.json").is_symlink()


# ---- 10: fsync before the rename --------------------------------------------------------------

def test_every_file_and_folder_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, output_mod.rename_noreplace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: Path, dst: Path) -> bool:
        events.append(("rename", str(src)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(output_mod, "rename_noreplace", rename)
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "sub").mkdir()
        (staging / "a.json").write_text("{}")
        (staging / "sub" / "b.bin").write_bytes(b"b" * 10)
    names = [Path(p).name for kind, p in events if kind == "fsync"]
    position = next(i for i, (kind, _) in enumerate(events) if kind == "rename")
    before = {Path(p).name for kind, p in events[:position] if kind == "fsync"}
    assert {"a.json", "b.bin", "sub", staging.name} <= before, events
    assert names[-1] == tmp_path.name  # the parent, after the rename


def test_writer_fsyncs_each_shard(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real(fd))[1])
    import torch

    tensors = [OutTensor.computed(f"t{i}", "F32", (256,), lambda: torch.ones(256))
               for i in range(3)]
    paths = write_checkpoint(tmp_path, tensors, max_shard_bytes=1024)
    assert sorted(map(str, paths)) == sorted(synced)


# ---- 11: kernel copy ------------------------------------------------------------------------

def test_copy_file_range_and_fallback_write_the_same_bytes(tiny_checkpoint, tmp_path,
                                                           monkeypatch):
    source = Checkpoint(tiny_checkpoint("mixtral"))
    plan = [OutTensor.copy(i) for i in source.tensors.values()]
    kernel = tmp_path / "kernel"
    kernel.mkdir()
    calls: list[int] = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(bytecopy, "MODE", "kernel")
    monkeypatch.setattr(bytecopy, "_kernel_ok", True)
    write_checkpoint(kernel, plan)
    assert len(calls) >= len(plan)

    def refuse(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    loop = tmp_path / "loop"
    loop.mkdir()
    write_checkpoint(loop, plan)
    assert bytecopy._kernel_ok is False  # fell back once, then stays on the loop
    assert (kernel / "model.safetensors").read_bytes() == (loop / "model.safetensors").read_bytes()
    shutil.copyfile(source.folder / "config.json", kernel / "config.json")
    copy = Checkpoint(kernel)
    for name in source.tensors:
        assert copy.read(name).equal(source.read(name)), name


def test_overwrite_deletes_the_old_output_in_the_background(tmp_path, monkeypatch):
    removed: list[Path] = []
    monkeypatch.setattr(output_mod, "remove_in_background", removed.append)
    out = tmp_path / "out"
    for text in ("old", "new"):
        with staged_output(out, overwrite=True) as staging:
            (staging / "x").write_text(text)
    assert (out / "x").read_text() == "new"
    assert len(removed) == 1 and (removed[0] / "x").read_text() == "old"
    monkeypatch.undo()
    output_mod.remove_in_background(removed[0])  # the real one: a detached `rm -rf`
    for _ in range(300):
        if not removed[0].exists():
            break
        time.sleep(0.1)
    assert not removed[0].exists()


def test_overwrite_drops_the_old_outputs_page_cache_first(tmp_path, monkeypatch):
    """Before writing, every regular file of the output being replaced gets
    posix_fadvise(DONTNEED) (its data stays); a link in it is not followed."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise here")
    out, outside = tmp_path / "out", tmp_path / "outside.bin"
    outside.write_bytes(b"not ours")
    with staged_output(out) as staging:
        (staging / "model.safetensors").write_bytes(b"old" * 1000)
        (staging / "sub").mkdir()
        (staging / "sub" / "a.json").write_text("{}")
    (out / "link").symlink_to(outside)
    advised: list[tuple[str, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    monkeypatch.setattr(output_mod, "remove_in_background", lambda path: None)
    with staged_output(out, overwrite=True) as staging:
        assert sorted(Path(p).name for p, _ in advised) == ["a.json", "model.safetensors"]
        assert {a for _, a in advised} == {os.POSIX_FADV_DONTNEED}
        assert (out / "model.safetensors").read_bytes() == b"old" * 1000  # data kept
        (staging / "model.safetensors").write_bytes(b"new")
    assert (out / "model.safetensors").read_bytes() == b"new"
    assert outside.read_bytes() == b"not ours"
