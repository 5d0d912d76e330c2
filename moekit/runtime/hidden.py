"""The hidden states of every calibration batch between two decoder layers.

One slot per batch, overwritten in place by each layer (1x activations: sum over batches of
B x S x H x itemsize bytes). On the compute device (CUDA: while under a quarter of the free
VRAM, else in host RAM) while that total stays under the RAM allowance; otherwise in one
plain file in a temporary folder, one fixed byte range per batch, read and written with
pread/pwrite (no memory map, so nothing of it stays resident). The folder is removed by
`close()`, also after errors; a full disk raises SpillError and leaves nothing.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from moekit.errors import MoekitError
from moekit.units import human

if TYPE_CHECKING:
    import torch


class SpillError(MoekitError):
    """The disk filled up (or failed) while hidden states were spilled."""


def no_room(what: str, folder: object, err: BaseException, needed: float) -> SpillError:
    """One line for a temporary folder that filled up: the folder, TMPDIR, the space needed."""
    reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[-1]
    tmpdir = os.environ.get("TMPDIR") or "unset"
    return SpillError(
        f"cannot spill {what} to {folder}: {reason} (needs about {human(needed, up=True)}; "
        f"TMPDIR={tmpdir})", "free space there, or set TMPDIR to a folder on a larger disk")


class HiddenStore:
    """`put(b, h)` / `get(b)` for batch slots; `spill` chooses the file over RAM, `offload`
    host RAM over the compute device (CUDA)."""

    def __init__(self, device: Any, spill: bool = False, folder: str | None = None,
                 offload: bool = False):
        self.device, self.spill, self.offload = device, spill, offload
        self.slots: dict[int, Any] = {}
        self.meta: dict[int, tuple[int, tuple[int, ...], Any]] = {}  # offset, shape, dtype
        self.end = 0
        self.folder = self.fd = None
        if spill:
            self.folder = tempfile.mkdtemp(prefix="moekit-hidden-", dir=folder)
            self.path = os.path.join(self.folder, "hidden.bin")
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def put(self, index: int, hidden: torch.Tensor) -> None:
        if not self.spill:
            self.slots[index] = hidden.to("cpu") if self.offload else hidden
            return
        data = hidden.detach().to("cpu").contiguous()
        raw = memoryview(data.view(-1).view(_byte_dtype()).numpy())
        if index not in self.meta:
            self.meta[index] = (self.end, tuple(data.shape), data.dtype)
            self.end += raw.nbytes
        offset = self.meta[index][0]
        try:
            written = os.pwrite(self.fd, raw, offset)
            if written != raw.nbytes:
                raise OSError(errno.ENOSPC, "short write")
        except OSError as err:
            self.close()
            raise SpillError(
                f"cannot spill hidden states to {self.folder}: {err.strerror or err} "
                f"(needs {self.end / 1e9:.2f} GB so far)",
                "free disk space, set TMPDIR to a larger disk, or raise --max-memory") from err

    def get(self, index: int) -> torch.Tensor:
        if not self.spill:
            return self.slots[index].to(self.device) if self.offload else self.slots[index]
        import torch

        offset, shape, dtype = self.meta[index]
        out = torch.empty(shape, dtype=dtype)
        raw = memoryview(out.view(-1).view(_byte_dtype()).numpy())
        if os.preadv(self.fd, [raw], offset) != raw.nbytes:
            self.close()
            raise SpillError(f"hidden-state file {self.path} was cut short",
                             "check the disk holding TMPDIR")
        return out.to(self.device)

    def close(self) -> None:
        self.slots.clear()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _byte_dtype() -> Any:
    import torch

    return torch.uint8
