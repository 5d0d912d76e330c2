"""Small new tensors (routers, zero gates) as bytes in a scratch file, so the streaming writer
copies them like any source tensor: a plain copy-upcycle then never imports torch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.errors import UnsupportedModelError
from moekit.io.dtypes import ITEM_SIZE
from moekit.io.reader import TensorInfo

if TYPE_CHECKING:
    import numpy as np


def encode(values: np.ndarray, dtype: str) -> bytes:
    """Little-endian bytes of float `values` in safetensors `dtype` (F64, F32, F16, BF16;
    BF16 rounds to nearest even)."""
    import numpy as np

    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "BF16":
        bits = values.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").tobytes()
    table = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
    if dtype not in table:
        raise UnsupportedModelError(f"cannot create {dtype} router weights",
                                    "upcycle writes routers in F32, F16, BF16 or F64")
    return values.astype(table[dtype]).tobytes()


class Scratch:
    """An append-only file of raw tensor bytes; `add()` returns the TensorInfo of what it
    wrote, ready for `OutTensor.copy(info, name=...)`. Delete it with `close()`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._offset = 0

    def add(self, name: str, dtype: str, shape: tuple[int, ...], data: bytes) -> TensorInfo:
        expected = ITEM_SIZE[dtype]
        for dim in shape:
            expected *= dim
        if len(data) != expected:
            raise ValueError(f"'{name}': {len(data)} bytes for {dtype}{list(shape)}")
        self._handle.write(data)
        start, self._offset = self._offset, self._offset + len(data)
        return TensorInfo(name, dtype, tuple(shape), self.path, start, self._offset)

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
        if self.path.exists():
            os.unlink(self.path)
