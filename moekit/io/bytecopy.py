"""Copying byte ranges of one file onto the end of another.

Two ways, chosen from `MOEKIT_COPY`:
- **loop** (default): a 1 MiB `readinto`/`write` loop.
- **kernel**: `os.copy_file_range` (`MOEKIT_COPY=kernel`, falling back to the loop where the file
  system refuses it), as `cp` does.
Measured as whole `moekit prune` processes on these VMs (docs/benchmarks.md), the loop used less
system time than `copy_file_range` and than a two-thread variant (one thread reading while the
other writes: faster in a single process, slower in whole runs).
1 MiB buffers stay in a core's L2 cache (8 MiB ones doubled the system time here).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, BinaryIO

from moekit.io.writeback import drop_read, uncached

if TYPE_CHECKING:
    from moekit.io.writeback import WriteBehind

CHUNK = 1 << 20
KERNEL_CHUNK = 1 << 30  # bytes per copy_file_range call (the kernel copies in pages)
MODE = os.environ.get("MOEKIT_COPY", "loop")  # loop | kernel (benchmarks compare them)
_kernel_ok = hasattr(os, "copy_file_range")


def write_all(fd: int, data: bytes | memoryview, behind: WriteBehind | None = None) -> None:
    """Write every byte of `data` to `fd` in CHUNK-sized calls (reported to `behind`)."""
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        chunk = view[start:start + CHUNK]
        while chunk:
            chunk = chunk[os.write(fd, chunk):]
        if behind is not None:
            behind.wrote(min(CHUNK, len(view) - start))


def copy_range(source: BinaryIO, fd: int, start: int, count: int, label: str,
               behind: WriteBehind | None = None) -> None:
    """Append bytes [start, start + count) of the open file `source` to `fd`; `label` is the
    message of the OSError raised when the source ends early; progress goes to `behind`,
    which also drops what was read when the range was not cached before
    (`writeback.uncached`)."""
    drop = behind is not None and behind.active and uncached(source.fileno(), start, count)
    done = 0
    if MODE == "kernel" and _kernel_ok:
        done = _kernel_copy(source.fileno(), fd, start, count, behind)
    if done < count:
        _loop_copy(source, fd, start + done, count - done, label, behind, drop)
    if drop:
        drop_read(source.fileno(), start, count)


def _loop_copy(source: BinaryIO, fd: int, start: int, count: int, label: str,
               behind: WriteBehind | None, drop: bool = False) -> None:
    """The 1 MiB loop; with `drop`, every `behind.window` bytes read leave the page cache."""
    view = memoryview(bytearray(min(CHUNK, max(count, 1))))
    source.seek(start)
    remaining, mark = count, start
    while remaining:
        read = source.readinto(view[:min(CHUNK, remaining)])
        if not read:
            raise OSError(label)
        write_all(fd, view[:read], behind)
        remaining -= read
        if drop and behind is not None and start + count - remaining - mark >= behind.window:
            drop_read(source.fileno(), mark, start + count - remaining - mark)
            mark = start + count - remaining


def _kernel_copy(src: int, dst: int, start: int, count: int,
                 behind: WriteBehind | None = None) -> int:
    """Copy with os.copy_file_range; returns the bytes copied (fewer when the kernel or file
    system cannot, so that the caller falls back to the loop)."""
    global _kernel_ok
    done = 0
    step_max = KERNEL_CHUNK if behind is None else behind.window
    while done < count:
        try:
            step = os.copy_file_range(src, dst, min(step_max, count - done), start + done)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                                 errno.EBADF, errno.EPERM):
                raise
            if done == 0:  # not supported here: use the loop from now on
                _kernel_ok = False
            return done
        if step == 0:
            return done
        done += step
        if behind is not None:
            behind.wrote(step)
    return done
