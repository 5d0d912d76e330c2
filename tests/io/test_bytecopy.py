"""`moekit.io.bytecopy`: both copy modes append exactly the requested bytes; a source that ends
early and a failing write raise, with nothing written past the failure."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from moekit.io import bytecopy


def random_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("mode", ["loop", "kernel"])
@pytest.mark.parametrize(("start", "count"), [(0, 0), (3, 17), (5, 3 * (1 << 20) + 11),
                                               ((1 << 20) - 1, 9 * (1 << 20) + 1)])
def test_copy_range_appends_exactly_the_range(mode, start, count, tmp_path, monkeypatch):
    monkeypatch.setattr(bytecopy, "MODE", mode)
    data = random_file(tmp_path / "src", 11 * (1 << 20))
    out = tmp_path / "out"
    out.write_bytes(b"head")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND)
    try:
        with open(tmp_path / "src", "rb", buffering=0) as source:
            bytecopy.copy_range(source, fd, start, count, "src ended")
            bytecopy.copy_range(source, fd, 0, 2, "src ended")  # a second copy from the start
    finally:
        os.close(fd)
    assert out.read_bytes() == b"head" + data[start:start + count] + data[:2]


def test_a_source_that_ends_early_raises_the_label(tmp_path):
    random_file(tmp_path / "src", 3 * (1 << 20))
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        with open(tmp_path / "src", "rb", buffering=0) as source, \
                pytest.raises(OSError, match="src ended while copying 'w'"):
            bytecopy.copy_range(source, fd, 1 << 20, 4 * (1 << 20), "src ended while copying 'w'")
    finally:
        os.close(fd)


def test_a_failing_write_stops_the_copy(tmp_path, monkeypatch):
    """Disk full in the middle of a copy: the caller gets ENOSPC, nothing more is written."""
    random_file(tmp_path / "src", 12 * (1 << 20))
    real, writes = os.write, []

    def failing_write(fd: int, data) -> int:
        writes.append(len(data))
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(bytecopy, "MODE", "loop")
    monkeypatch.setattr(bytecopy.os, "write", failing_write)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        with open(tmp_path / "src", "rb", buffering=0) as source, \
                pytest.raises(OSError) as caught:
            bytecopy.copy_range(source, fd, 0, 12 * (1 << 20), "src ended")
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert caught.value.errno == errno.ENOSPC
    assert len(writes) == 3
    assert (tmp_path / "out").stat().st_size == 2 * (1 << 20)
