"""Per-layer tensors kept on disk between a layered run and the write that needs them.

A calibrated prune refits down projections layer by layer during the engine's run, and merge
captures every layer's calibration activations in one run, but both use them later (writing
the checkpoint, grouping). Holding all layers would cost `layers x (that layer's share)` of
RAM, so each layer's tensors go to one safetensors file in a temporary folder (`$TMPDIR`, or
the `folder` given) as soon as the layer is done, and come back one layer (or one tensor) at a
time. The folder is removed by `close()` or, at the latest, when the spill is garbage
collected or the interpreter exits; a full disk removes it and raises one-line SpillError.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.runtime.hidden import no_room

if TYPE_CHECKING:
    import torch


def _out_of_space(err: BaseException) -> bool:
    """A full disk or quota, however the writing library words it."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(s in str(err) for s in ("No space left", "Disk quota exceeded", "ENOSPC"))


class TensorSpill:
    """`put(key, {name: tensor})` writes one file per key; `get(key)` reads them all back,
    `layer(key)` gives a lazy `{int(name): tensor}` mapping that reads a tensor on access."""

    def __init__(self, prefix: str = "moekit-spill-", folder: str | None = None):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
        self.names: dict[int, tuple[str, ...]] = {}
        self.written = 0
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def _file(self, key: int) -> Path:
        return self.path / f"{key}.safetensors"

    def put(self, key: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        held = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
        try:
            save_file(held, str(self._file(key)))
        except Exception as err:  # safetensors raises SafetensorError, not OSError
            if not _out_of_space(err):
                raise
            needed = self.written + sum(t.numel() * t.element_size() for t in held.values())
            folder = self.path
            self.close()
            raise no_room("calibration tensors", folder, err, needed) from err
        self.written += self._file(key).stat().st_size
        self.names[key] = tuple(tensors)

    def get(self, key: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self._file(key))) if key in self.names else {}

    def read(self, key: int, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file(key)), framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, key: int, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self._file(key)), framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def layer(self, key: int) -> SpilledLayer:
        return SpilledLayer(self, key)

    def close(self) -> None:
        self._cleanup()


class SpilledLayer(Mapping[int, "torch.Tensor"]):
    """One key's tensors named by integers (expert ids), each read from disk when accessed."""

    def __init__(self, spill: TensorSpill, key: int):
        self.spill, self.key = spill, key

    def __getitem__(self, item: int) -> torch.Tensor:
        if str(item) not in self.spill.names.get(self.key, ()):
            raise KeyError(item)
        return self.spill.read(self.key, str(item))

    def __contains__(self, item: object) -> bool:  # without reading the tensor
        return str(item) in self.spill.names.get(self.key, ())

    def shape_of(self, item: int) -> tuple[int, ...]:
        """The shape of tensor `item` without reading it."""
        if item not in self:
            raise KeyError(item)
        return self.spill.shape(self.key, str(item))

    def __iter__(self) -> Iterator[int]:
        return iter(int(n) for n in self.spill.names.get(self.key, ()))

    def __len__(self) -> int:
        return len(self.spill.names.get(self.key, ()))
