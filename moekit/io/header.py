"""One safetensors header, parsed and checked whole before any weight is read.

File layout: `u64 little-endian N | N bytes of JSON | data`. The JSON maps tensor names to
`{"dtype", "shape", "data_offsets": [start, end]}` (offsets relative to the data) plus an
optional `"__metadata__": {str: str}`. A valid header, as safetensors itself requires:
every dtype known, every shape a list of non-negative ints, end - start = prod(shape) x itemsize,
and the ranges sorted by start tile the data exactly: the first starts at 0, each starts where
the previous ended (no overlap, no gap), the last ends at the end of the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.errors import CheckpointError
from moekit.io.dtypes import ITEM_SIZE

MAX_HEADER_BYTES = 100 * 1024 * 1024
FIX = "re-download or re-save this shard"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its shard and absolute byte range [start, end)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path) -> ShardHeader:
    """Parse and validate one safetensors header (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path.name}: file is truncated ({size} bytes, no header)",
                                      FIX)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path.name}: header length {header_len} exceeds the file ({size} bytes): "
                    "truncated or not a safetensors file", FIX)
            raw = handle.read(header_len)
    except OSError as err:
        raise CheckpointError(f"cannot read {path.name}: {err.strerror}") from err
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    base = 8 + header_len
    tensors = {name: _tensor_info(path, name, entry, base) for name, entry in header.items()}
    _check_tiling(path, list(tensors.values()), base, size)
    return ShardHeader(path, tensors, metadata)


def _parse_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError
        where = f" at byte {err.pos}" if isinstance(err, json.JSONDecodeError) else ""
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not UTF-8 JSON{where})",
                              FIX) from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)", FIX)
    return header


def _metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (__metadata__ must map "
                              "strings to strings)", FIX)
    return value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: Path, name: str, entry: Any, base: int) -> TensorInfo:
    """One entry: dtype known, shape and offsets non-negative ints, bytes = numel x itemsize."""
    bad = f"{path.name}: corrupt header entry for tensor '{name[:200]}'"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad} (not an object)", FIX)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_SIZE:
        shown = dtype[:20] if isinstance(dtype, str) else type(dtype).__name__
        raise CheckpointError(f"{bad} (unknown dtype '{shown}'; known: "
                              f"{', '.join(ITEM_SIZE)})", FIX)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{bad} (shape must be a list of non-negative integers)", FIX)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CheckpointError(f"{bad} (data_offsets must be two non-negative integers)", FIX)
    start, end = offsets
    expected = math.prod(shape) * ITEM_SIZE[dtype]
    if end < start or end - start != expected:
        raise CheckpointError(f"{path.name}: tensor '{name[:200]}' has data_offsets "
                              f"[{start}, {end}] but {dtype}{shape} needs {expected} bytes", FIX)
    return TensorInfo(name, dtype, tuple(shape), path, base + start, base + end)


def _check_tiling(path: Path, tensors: list[TensorInfo], base: int, size: int) -> None:
    """Byte ranges sorted by start must cover [base, size) exactly, without overlap or gap."""
    position = base
    previous = None
    for info in sorted(tensors, key=lambda t: (t.start, t.end)):
        if info.start < position:
            raise CheckpointError(f"{path.name}: tensors '{previous}' and '{info.name[:200]}' "
                                  "overlap (shared or duplicated bytes)", FIX)
        if info.start > position:
            raise CheckpointError(f"{path.name}: {info.start - position} bytes before tensor "
                                  f"'{info.name[:200]}' belong to no tensor", FIX)
        position, previous = info.end, info.name[:200]
    if position > size:
        raise CheckpointError(
            f"{path.name}: tensor '{previous}' ends at byte {position} but the file has {size} "
            "bytes: the file is truncated", FIX)
    if position < size:
        raise CheckpointError(f"{path.name}: {size - position} bytes after the last tensor "
                              "belong to no tensor", FIX)
