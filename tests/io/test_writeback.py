"""`moekit.io.writeback`: the writer flushes each window before dropping it, covers the whole
file, leaves the bytes intact, and the written file really leaves the page cache (checked with
mincore(2) on a mapping of it, independently of the calls moekit makes)."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.io import bytecopy, writeback
from moekit.io.reader import Checkpoint
from moekit.io.writer import OutTensor, write_checkpoint

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux") or
                                writeback._sync_file_range is None,
                                reason="sync_file_range is Linux-only")


def resident_share(path: Path) -> float:
    """Share of `path`'s pages in the page cache, from mincore(2) on a shared mapping."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    page = mmap.PAGESIZE
    with open(path, "r+b") as handle:
        mapped = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_WRITE)
        try:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
            return sum(v & 1 for v in vec) / pages
        finally:
            del addr
            mapped.close()


def big_source(folder: Path, mib: int = 24) -> tuple[Path, torch.Tensor]:
    folder.mkdir()
    big = torch.randn(mib * (1 << 20) // 4)
    save_file({"big": big.clone()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder, big


@pytest.mark.parametrize("mode", ["loop", "kernel"])
def test_windows_are_flushed_then_dropped_in_order(mode, tmp_path, monkeypatch):
    monkeypatch.setattr(bytecopy, "MODE", mode)
    monkeypatch.setattr(writeback, "WINDOW", 2 << 20)
    monkeypatch.setattr(writeback, "LAG", 3)
    monkeypatch.setattr(writeback, "ENABLED", True)
    source, big = big_source(tmp_path / "src")
    calls: list[tuple] = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(writeback, "_sync_file_range",
                        lambda fd, start, size, flags: calls.append(("sync", start, size, flags))
                        or 0)
    monkeypatch.setattr(writeback.os, "posix_fadvise",
                        lambda fd, start, size, advice: calls.append(("drop", start, size))
                        or real_fadvise(fd, start, size, advice))
    out = tmp_path / "out"
    out.mkdir()
    info = Checkpoint(source).tensors["big"]
    write_checkpoint(out, [OutTensor.copy(info, name="copied"),
                           OutTensor.computed("made", "F32", tuple(big.shape), lambda: big * 2)])
    size = (out / "model.safetensors").stat().st_size
    started = [(s, n) for kind, s, n, *rest in calls if kind == "sync" and rest == [2]]
    waited = [(s, n) for kind, s, n, *rest in calls if kind == "sync" and rest == [7]]
    dropped = [(c[1], c[2]) for c in calls if c[0] == "drop" and c[2]]
    assert started[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(started, started[1:], strict=False))
    assert all(n >= 2 << 20 for _, n in started)
    assert started[-1][0] + started[-1][1] > size - (3 << 20)  # all but the last window
    assert len(started) > 10
    assert waited == started[:-3] and dropped == started[:-3]  # each dropped after its wait
    for n, wait in enumerate(waited):  # waited for only once 3 newer windows were started
        assert calls.index(("sync", *started[n + 3], 2)) < calls.index(("sync", *wait, 7))
    for wait, drop in zip(waited, dropped, strict=True):
        assert calls.index(("sync", *wait, 7)) < calls.index(("drop", *drop))
    assert calls[-1] == ("drop", 0, 0)  # after the fsync: the rest of the file
    got = load_file(str(out / "model.safetensors"))
    assert torch.equal(got["copied"], big) and torch.equal(got["made"], big * 2)


def test_a_refused_sync_turns_it_off_and_the_file_is_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(writeback, "WINDOW", 1 << 20)
    monkeypatch.setattr(writeback, "ENABLED", True)
    source, big = big_source(tmp_path / "src", mib=6)
    calls: list[int] = []
    monkeypatch.setattr(writeback, "_sync_file_range",
                        lambda fd, start, size, flags: calls.append(start) or -1)
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(out, [OutTensor.copy(Checkpoint(source).tensors["big"])])
    assert calls == [0]  # tried once, then plain writes
    assert torch.equal(load_file(str(out / "model.safetensors"))["big"], big)


@linux_only
@pytest.mark.parametrize("enabled", [True, False])
def test_the_written_file_leaves_the_page_cache(enabled, tmp_path, monkeypatch):
    monkeypatch.setattr(writeback, "ENABLED", enabled)
    monkeypatch.setattr(writeback, "WINDOW", 4 << 20)
    source, big = big_source(tmp_path / "src", mib=32)
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(out, [OutTensor.copy(Checkpoint(source).tensors["big"])])
    share = resident_share(out / "model.safetensors")
    if enabled:
        assert share < 0.2
    else:
        if share < 0.5:
            pytest.skip("this file system does not keep written pages cached")
        assert share > 0.5
    assert torch.equal(load_file(str(out / "model.safetensors"))["big"], big)


@linux_only
@pytest.mark.parametrize("was_cached", [True, False])
def test_a_cold_source_is_dropped_after_the_copy_and_a_warm_one_stays(was_cached, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(writeback, "ENABLED", True)
    monkeypatch.setattr(writeback, "WINDOW", 4 << 20)
    source, big = big_source(tmp_path / "src", mib=32)
    shard = source / "model.safetensors"
    fd = os.open(shard, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if writeback.uncached(fd, 0, shard.stat().st_size) is False:
            pytest.skip("cachestat(2) is not available (Linux < 6.5)")
        if was_cached:
            while os.read(fd, 1 << 20):
                pass
    finally:
        os.close(fd)
    before = resident_share(shard)
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(out, [OutTensor.copy(Checkpoint(source).tensors["big"])])
    after = resident_share(shard)
    if was_cached:
        assert before > 0.9 and after > 0.9  # the user's cache is left alone
    else:
        assert before < 0.1 and after < 0.1  # what the copy read is gone again
    assert torch.equal(load_file(str(out / "model.safetensors"))["big"], big)
