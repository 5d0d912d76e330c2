"""Read checkpoint bytes straight into device memory through two reused host buffers.

For an accelerator the layer's tensors are allocated on the device, and every byte range is
read in chunks of `CHUNK` bytes into one of two host buffers (page-locked when CUDA is present)
and copied to its place on the device with `non_blocking=True`. While one chunk is copied, the
next is read into the other buffer; a buffer is reused only after the event recorded behind its
last copy has completed. So the host holds 2 x CHUNK bytes whatever the layer size (no host copy
of the layer), pages are touched once (the buffers are reused), and the copy engine overlaps the
file reads. The copies are enqueued on the current stream, so kernels enqueued after them on that
stream see the data without any host synchronisation.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError

if TYPE_CHECKING:
    import torch

CHUNK = 16 << 20


class Staging:
    """Two host buffers of `chunk` bytes and the events guarding their reuse."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self.lock = threading.Lock()  # one reader at a time (the prefetch thread and the caller)
        self._buffers: list[torch.Tensor] = []
        self._events: list[Any] = [None, None]
        self._next = 0

    def _buffer(self, index: int) -> torch.Tensor:
        import torch

        if not self._buffers:
            pin = torch.cuda.is_available()
            self._buffers = [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=pin)
                             for _ in range(2)]
        event = self._events[index]
        if event is not None:
            event.synchronize()
            self._events[index] = None
        return self._buffers[index]

    def fill(self, handle: Any, start: int, count: int, dest: torch.Tensor, name: str) -> None:
        """Copy file bytes [start, start + count) of `handle` into `dest` (a contiguous uint8
        tensor of `count` bytes on any device)."""
        import torch

        done = 0
        while done < count:
            n = min(self.chunk, count - done)
            index, self._next = self._next, 1 - self._next
            view = self._buffer(index)[:n]
            handle.seek(start + done)
            if handle.readinto(memoryview(view.numpy())) != n:
                raise CheckpointError(f"{Path(handle.name).name}: short read of '{name}'",
                                      "the shard is truncated: re-download it")
            dest[done:done + n].copy_(view, non_blocking=True)
            if dest.is_cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(dest.device))
                self._events[index] = event
            done += n
