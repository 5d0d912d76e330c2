"""Streaming sharded safetensors writer.

Tensors are planned first (name, dtype, shape, where the bytes come from), assigned to shards of
at most `max_shard_bytes`, and then written one at a time in 1 MiB `write()` calls: pass-through
tensors are copied as byte ranges of their source file without becoming torch tensors, computed
tensors are produced by a callable only when their turn comes. Peak memory is one tensor.

Byte ranges are copied by `bytecopy.copy_range` (1 MiB buffers). Every shard is written behind
(`writeback.WriteBehind`: flushed to disk and dropped from the page cache window by window while
the copy goes on) and fsynced before it is closed, so "wrote" means the bytes are on disk.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.io import bytecopy
from moekit.io.dtypes import ITEM_SIZE, from_torch
from moekit.io.reader import INDEX_NAME, TensorInfo
from moekit.io.writeback import WriteBehind

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: copied from `copy_of` (a byte range) or built by `produce()`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    copy_of: TensorInfo | None = None
    produce: Callable[[], torch.Tensor] | None = None
    pieces: tuple[TensorInfo, ...] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEM_SIZE[self.dtype]

    @staticmethod
    def copy(info: TensorInfo, name: str | None = None) -> OutTensor:
        """Pass `info` through unchanged (optionally under a new name)."""
        return OutTensor(name or info.name, info.dtype, info.shape, copy_of=info)

    @staticmethod
    def gather(name: str, dtype: str, shape: tuple[int, ...],
               pieces: tuple[TensorInfo, ...]) -> OutTensor:
        """The concatenation of byte ranges (e.g. kept rows of a fused tensor), copied like
        `copy` without becoming a torch tensor."""
        pieces = tuple(pieces)
        tensor = OutTensor(name, dtype, tuple(shape), pieces=pieces)
        held = sum(p.nbytes for p in pieces)
        if held != tensor.nbytes:
            raise ValueError(f"'{name}': pieces hold {held} bytes but {dtype}{list(shape)} "
                             f"needs {tensor.nbytes}")
        return tensor

    @staticmethod
    def computed(name: str, dtype: str, shape: tuple[int, ...],
                 produce: Callable[[], torch.Tensor]) -> OutTensor:
        return OutTensor(name, dtype, tuple(shape), produce=produce)


def shard_names(count: int) -> list[str]:
    """Hub shard names: `model.safetensors` alone, else `model-0000i-of-0000N.safetensors`."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Split tensors, in order, into shards no larger than `max_shard_bytes` (a tensor larger
    than the limit gets a shard of its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [s for s in shards if s] or [[]]


def write_checkpoint(folder: Path, tensors: Iterable[OutTensor], *,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     metadata: dict[str, str] | None = None,
                     on_tensor: Callable[[OutTensor], None] | None = None) -> list[Path]:
    """Write `tensors` as Hub-named shards (+ index when sharded) into `folder`.

    `on_tensor` is called after each tensor is written (progress bars). Returns the shard paths.
    """
    tensors = list(tensors)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"tensor '{dup}' planned twice")
    shards = plan_shards(tensors, max_shard_bytes)
    paths = [Path(folder) / name for name in shard_names(len(shards))]
    meta = {"format": "pt", **(metadata or {})}
    for path, shard in zip(paths, shards, strict=True):
        _write_shard(path, shard, meta, on_tensor)
    if len(paths) > 1:
        weight_map = {t.name: p.name for p, shard in zip(paths, shards, strict=True) for t in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (Path(folder) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def _write_shard(path: Path, shard: list[OutTensor], metadata: dict[str, str],
                 on_tensor: Callable[[OutTensor], None] | None) -> None:
    # Largest items first keeps every tensor aligned to its element size, as save_file does.
    ordered = sorted(shard, key=lambda t: -ITEM_SIZE[t.dtype])
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for tensor in ordered:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    behind = WriteBehind(fd)
    try:
        bytecopy.write_all(fd, len(raw).to_bytes(8, "little") + raw, behind)
        for tensor in ordered:
            if tensor.copy_of is not None:
                _copy_range(fd, tensor.copy_of, behind)
            elif tensor.pieces is not None:
                for piece in tensor.pieces:
                    _copy_range(fd, piece, behind)
            else:
                _write_tensor(fd, tensor, behind)
            if on_tensor:
                on_tensor(tensor)
        os.fsync(fd)
        behind.finish()
    finally:
        os.close(fd)


def _copy_range(fd: int, info: TensorInfo, behind: WriteBehind | None = None) -> None:
    """Append bytes [start, end) of `info.shard` to `fd` (`bytecopy.copy_range`)."""
    with open(info.shard, "rb", buffering=0) as source:
        bytecopy.copy_range(source, fd, info.start, info.nbytes,
                            f"{info.shard.name} ended while copying '{info.name}'", behind)


def _write_tensor(fd: int, tensor: OutTensor, behind: WriteBehind | None = None) -> None:
    import torch

    assert tensor.produce is not None
    value = tensor.produce().detach().to("cpu")
    if from_torch(value.dtype) != tensor.dtype or tuple(value.shape) != tensor.shape:
        raise ValueError(f"'{tensor.name}' was planned as {tensor.dtype}{list(tensor.shape)} but "
                         f"produced {from_torch(value.dtype)}{list(value.shape)}")
    data = value.contiguous().reshape(-1).view(torch.uint8).numpy()
    bytecopy.write_all(fd, memoryview(data), behind)
