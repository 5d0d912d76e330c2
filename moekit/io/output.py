"""Output folders that appear whole or not at all, and side files checked before any work.

`staged_output(out)` writes into a hidden sibling `.NAME.moekit-partial-PID-XXXX`, fsyncs every file
and folder, then renames it into place; without `overwrite` the rename never replaces anything
(two runs into one `--out`: exactly one wins). Any exception, Ctrl-C, SIGTERM or SIGHUP removes
the staging folder. `check_outputs` refuses unusable paths before the heavy work.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import (
    DiskFullError,
    InvalidArgumentError,
    OutputExistsError,
    Terminated,
)
from moekit.io.config import write_config
from moekit.io.regular import AUX_NAMES, check_inputs
from moekit.io.writer import DEFAULT_SHARD_BYTES, write_checkpoint
from moekit.units import human

if TYPE_CHECKING:
    from moekit.io.reader import Checkpoint
    from moekit.io.writer import OutTensor

TABLE_SUFFIXES = (".csv", ".parquet", ".json")
AUX_SUFFIXES = (".tiktoken", ".jinja", ".model")  # tokenizer data, never code
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                     if s is not None)


def check_output(out: Path, overwrite: bool, inputs: Iterable[Path | None] = ()) -> Path:
    """Fail early when `out` cannot become an output folder: it overlaps an input, is the
    current folder (`.`), a mount point or the root, is a non-empty folder (without
    `overwrite`) or a file, or its parent cannot be written. Returns the resolved path."""
    resolved = Path(out).expanduser().resolve()
    for source in (Path(p).expanduser().resolve() for p in inputs if p is not None):
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(
                source):
            raise InvalidArgumentError(f"output folder {out} overlaps the input {source}",
                                       "choose an output folder outside the input checkpoint")
    if resolved.parent == resolved or Path.cwd().is_relative_to(resolved):
        raise InvalidArgumentError(
            f"--out {out} is {resolved}, the current folder or one holding it: moekit writes "
            "a new folder and renames it into place", "pass a new folder name, e.g. --out ./out")
    if resolved.is_dir() and os.path.ismount(resolved):
        raise InvalidArgumentError(f"--out {out} is a mount point and cannot be replaced",
                                   "pass a folder inside it")
    if resolved.exists() and not resolved.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder",
                                "choose another --out path")
    if resolved.is_dir() and any(resolved.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {out} exists and is not empty",
                                "choose another --out or pass --overwrite")
    _check_writable_parent(resolved, "--out", out)
    return resolved


def check_side_file(path: Path, option: str, suffixes: tuple[str, ...],
                    inputs: Iterable[Path | None] = (), out: Path | None = None) -> Path:
    """A file option (`--report`, `--plan-out`, `--export...`): a known extension, not a
    folder, outside every input and outside the output folder, in a writable place."""
    resolved = Path(path).expanduser().resolve()
    suffix = resolved.suffix.lower()
    if suffix not in suffixes:
        raise InvalidArgumentError(f"{option} {path}: cannot write a '{suffix or resolved.name}'"
                                   " file", f"use a {' or '.join(suffixes)} file name")
    if resolved.is_dir():
        raise InvalidArgumentError(f"{option} {path} is a folder", "pass a file name")
    for source in (Path(p).expanduser().resolve() for p in inputs if p is not None):
        if resolved == source or resolved.is_relative_to(source):
            raise InvalidArgumentError(f"{option} {path} is inside the input {source}",
                                       "write it outside the input checkpoint")
    if out is not None and resolved.is_relative_to(Path(out).expanduser().resolve()):
        raise InvalidArgumentError(f"{option} {path} is inside the output folder {out}",
                                   "write it beside the output folder")
    _check_writable_parent(resolved, option, path)
    return resolved


def check_outputs(inputs: Iterable[Path | None], out: Path | None = None,
                  overwrite: bool = False,
                  files: dict[str, tuple[Path | None, tuple[str, ...]]] | None = None) -> None:
    """Every output of a command, checked before any heavy work: the `--out` folder (when
    given) and each side file `files[option] = (path or None, allowed suffixes)`; and every
    input is a regular file (`moekit.io.regular.check_inputs`)."""
    inputs = tuple(p for p in inputs if p is not None)
    check_inputs(inputs, InvalidArgumentError)
    if out is not None:
        check_output(out, overwrite, inputs)
    for option, (path, suffixes) in (files or {}).items():
        if path is not None:
            check_side_file(path, option, suffixes, inputs, out)


def check_free_space(out: Path, needed: int) -> None:
    """Refuse before writing when the file system that will hold `out` has fewer than `needed`
    bytes free (a later ENOSPC is still caught by `staged_output`)."""
    parent = Path(out).expanduser().resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise DiskFullError(f"{out} needs {human(needed, up=True)} but only "
                            f"{human(free, up=False)} are free in {parent}",
                            "free space on that disk or choose another --out")


def _check_writable_parent(resolved: Path, option: str, shown: Path) -> None:
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{option} {shown}: cannot create files in {parent}",
                                   "choose a writable location")


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt) like Ctrl-C
    does, so `finally`/`except` cleanup runs; a second signal during cleanup is ignored.
    Does nothing outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001
        if not fired:
            fired.append(signum)
            raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def staged_output(out: Path, overwrite: bool = False,
                  inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it is fsynced and takes `out`'s
    place (replacing it only with `overwrite`), on error or signal it is removed, so no run
    ever leaves a half-written output that looks valid."""
    out = check_output(out, overwrite, inputs)
    if overwrite:
        drop_cached(out)
    with stop_signals_raise():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.moekit-partial-{os.getpid()}-",
                                            dir=out.parent))
        except OSError as err:
            raise InvalidArgumentError(f"cannot create the output folder in {out.parent}: "
                                       f"{err.strerror}", "choose a writable location") from err
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; an output is a normal folder
        try:
            yield staging
            fsync_tree(staging)
            retired = _place(staging, out, overwrite)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"no space left for {out} ({err.strerror}); the partial "
                                    "output was removed", "free space on that disk or choose "
                                    "another --out") from err
            raise
    fsync_dir(out.parent)  # the rename is durable before any old data is freed
    if retired is not None:
        remove_in_background(retired)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _place(staging: Path, out: Path, overwrite: bool) -> Path | None:
    """Rename `staging` to `out`. Without `overwrite` never replace anything that appeared
    meanwhile; with it, move the old folder aside and return where it went (to delete)."""
    if not overwrite:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder may be replaced; a non-empty one never
        if not rename_noreplace(staging, out):
            raise OutputExistsError(f"output folder {out} was created by another process while"
                                    " this run was writing; nothing was replaced",
                                    "choose another --out or pass --overwrite")
        return None
    retired = out.parent / f".{out.name}.moekit-old-{os.getpid()}"
    for _ in range(5):
        try:
            out.rename(retired)
        except FileNotFoundError:
            pass
        except OSError as err:  # an old folder of ours from an earlier round is in the way
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            remove_in_background(retired.rename(retired.with_name(retired.name + "-")))
            continue
        if rename_noreplace(staging, out):
            return retired if retired.exists() else None
    raise OutputExistsError(f"output folder {out} keeps being recreated by another process",
                            "let the other run finish, then try again")


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Atomically rename `src` to `dst` unless `dst` exists (renameat2 RENAME_NOREPLACE, or a
    plain rename, which never replaces a non-empty folder). False when `dst` exists."""
    libc_rename = _renameat2()
    if libc_rename is not None:
        at_fdcwd, noreplace = -100, 1
        if libc_rename(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            return False
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(dst))
    if dst.exists():
        return False
    try:
        os.rename(src, dst)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            return False
        raise
    return True


def _renameat2():  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2
    except (OSError, AttributeError):
        return None


def remove_in_background(path: Path) -> None:
    """Delete `path` in a detached process so freeing a large old output does not delay this
    run; falls back to deleting it here when no process can be started."""
    try:
        subprocess.Popen(["rm", "-rf", "--", str(path)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def drop_cached(folder: Path) -> None:
    """Ask the kernel to drop the page cache of the files of an output about to be replaced
    (`posix_fadvise` DONTNEED; their data stays on disk): the new output's pages then reuse that
    memory instead of pushing other data out or touching fresh memory (docs/benchmarks.md)."""
    if not hasattr(os, "posix_fadvise") or not folder.is_dir():
        return
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                fd = os.open(Path(root) / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder, deepest first."""
    folders = []
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        folders.append(Path(root))
    for path in reversed(folders):
        fsync_dir(path)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(fd)


def copy_aux_files(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer, generation-config, chat-template and licence files that are regular
    files inside `source` (a link is followed only when its target stays in the folder, as the
    Hub cache's are not; those are copied as files). Returns their names."""
    source = Path(source)
    copied = []
    for path in sorted(source.iterdir()):
        if not (path.name in AUX_NAMES or path.suffix in AUX_SUFFIXES):
            continue
        if not _regular_inside(path, source):
            continue
        shutil.copyfile(path, Path(dest) / path.name, follow_symlinks=True)
        copied.append(path.name)
    return copied


def uncopied_aux_files(source: Path) -> list[str]:
    """Aux files (tokenizer, ...) of `source` that `copy_aux_files` leaves out: links whose
    target leaves the folder, or that are not regular files."""
    folder = Path(source)
    if not folder.is_dir():
        return []
    return [p.name for p in sorted(folder.iterdir())
            if (p.name in AUX_NAMES or p.suffix in AUX_SUFFIXES) and not _regular_inside(p, folder)]


def _regular_inside(path: Path, folder: Path) -> bool:
    """A regular file, reached directly or through links that stay inside `folder` (or, for
    a Hub snapshot, inside the repo's cache folder that holds `snapshots/` and `blobs/`)."""
    if not path.is_symlink():
        return path.is_file()
    target = path.resolve()
    roots = [folder.resolve()]
    if folder.resolve().parent.name == "snapshots":
        roots.append(folder.resolve().parent.parent / "blobs")
    return target.is_file() and any(target.is_relative_to(r) for r in roots)


def write_model_folder(checkpoint: Checkpoint, out: Path, tensors: list[OutTensor],
                       config: dict[str, Any], *, overwrite: bool = False,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       on_bytes: Callable[[int, int], None] | None = None,
                       finish: Callable[[Path], None] | None = None) -> None:
    """Write a surgery's output (staged: whole or nothing): `tensors` as Hub-named shards with
    the source shards' metadata, `config`, the source's tokenizer/aux files, then `finish(staging
    folder)` (provenance, model card, evaluation) before the rename. `on_bytes(written, total)`
    is called once with 0 and after every tensor."""
    metadata: dict[str, str] = {}
    for shard in checkpoint.shards:
        metadata.update(shard.metadata)
    total = sum(t.nbytes for t in tensors)
    check_free_space(Path(out), total)
    if on_bytes:
        on_bytes(0, total)
    with staged_output(Path(out), overwrite, inputs=(checkpoint.folder,)) as staging:
        write_checkpoint(staging, tensors, max_shard_bytes=max_shard_bytes, metadata=metadata,
                         on_tensor=(lambda t: on_bytes(t.nbytes, total)) if on_bytes else None)
        write_config(config, staging)
        copy_aux_files(checkpoint.folder, staging)
        if finish is not None:
            finish(staging)
