"""Write-behind for the files moekit writes: the disk writes while the copy goes on, and the
written pages leave the page cache so that the next ones reuse them.

Every WINDOW bytes appended to a file, `WriteBehind.wrote` starts the write-back of that window
(`sync_file_range(WRITE)`); once more than LAG windows are in write-back, it waits for the oldest
to reach the disk (`WAIT_BEFORE | WRITE | WAIT_AFTER`) and drops it from the page cache
(`posix_fadvise(DONTNEED)`). So at most LAG + 1 windows of the output (144 MiB) are dirty or
cached at any time; after the caller's `fsync`, `finish` drops the rest.

Without it a multi-GB output fills the page cache with fresh pages, which these VMs hand out
slowly (first-touch memory), and the final `fsync` writes everything at once
(docs/benchmarks.md, "write-behind"). The price: the next command that opens the output reads it
from disk, not from the cache.

The same holds for what is read: `uncached(fd, start, count)` says (cachestat(2), Linux 6.5+)
whether a source range was outside the page cache before the copy; the copy then drops what it
has read of it window by window (`drop_read`), so a cold source does not need fresh pages either,
while a source the user had in the cache stays there.

Only on Linux (`sync_file_range` from libc); elsewhere, or with `MOEKIT_WRITE_BEHIND=0`, every
call is a no-op and the caller's `fsync` does all the work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections import deque
from collections.abc import Callable

WINDOW = 16 << 20  # bytes per write-back window
LAG = 8  # windows in write-back before the oldest is waited for (8 x 16 MiB measured best)
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4  # <linux/fs.h> SYNC_FILE_RANGE_*
ENABLED = os.environ.get("MOEKIT_WRITE_BEHIND", "1") != "0"


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_sync_file_range = _load_sync_file_range()
_CACHESTAT = 451  # the cachestat syscall's number on every architecture (asm-generic table)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def _load_syscall() -> Callable[..., int] | None:
    if _sync_file_range is None or not os.uname().sysname == "Linux":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None


_syscall = _load_syscall()


def uncached(fd: int, start: int, count: int) -> bool:
    """Is (almost) none of bytes [start, start + count) of `fd` in the page cache? False when
    it cannot be told (no cachestat: kernels before 6.5, other systems) or when disabled."""
    if not ENABLED or _syscall is None or count <= 0:
        return False
    span, stat = _CachestatRange(start, count), _Cachestat()
    if _syscall(_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        return False
    return stat.nr_cache * 10 < count // mmap.PAGESIZE + 1


def drop_read(fd: int, start: int, count: int) -> None:
    """Drop bytes [start, start + count) of a source that was read through the cache."""
    os.posix_fadvise(fd, start, count, os.POSIX_FADV_DONTNEED)


class WriteBehind:
    """Tracks how much has been appended to `fd` (from offset `start`) and flushes and drops
    it window by window (module doc). Advisory only: a failing call turns it off for the file,
    never the write itself (the caller's `fsync` still reports real I/O errors)."""

    def __init__(self, fd: int, start: int = 0, window: int | None = None) -> None:
        self.fd, self.window = fd, window or WINDOW
        self.active = ENABLED and _sync_file_range is not None
        self.mark = self.end = start  # [mark, end): appended, write-back not started yet
        self.pending: deque[tuple[int, int]] = deque()  # (start, size) in write-back

    def wrote(self, count: int) -> None:
        """`count` more bytes were appended."""
        self.end += count
        if self.active and self.end - self.mark >= self.window:
            self._next_window()

    def finish(self) -> None:
        """After the caller's fsync: drop what is left of the file from the page cache."""
        if self.active:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _next_window(self) -> None:
        assert _sync_file_range is not None
        length = self.end - self.mark
        if _sync_file_range(self.fd, self.mark, length, _WRITE) != 0:
            self.active = False  # e.g. a file system or pipe that refuses it: plain writes
            return
        self.pending.append((self.mark, length))
        self.mark = self.end
        if len(self.pending) > LAG:
            start, size = self.pending.popleft()
            _sync_file_range(self.fd, start, size, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            os.posix_fadvise(self.fd, start, size, os.POSIX_FADV_DONTNEED)
