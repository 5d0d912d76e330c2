"""A lazy safetensors checkpoint reader that trusts nothing: the index is checked against the
shard headers, and every tensor's byte range against its file, before any weight is read."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError, ModelSourceError
from moekit.io.dtypes import ITEM_SIZE

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024


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
    """Parse one safetensors header (no tensor data is read) and check every byte range."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path.name}: file is truncated ({size} bytes, no header)",
                                      "re-download or re-save this shard")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path.name}: header length {header_len} exceeds the file ({size} bytes): "
                    "truncated or not a safetensors file", "re-download or re-save this shard")
            raw = handle.read(header_len)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}") from err
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path.name}: corrupt safetensors header ({err})",
                              "re-download or re-save this shard") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    base = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: _tensor_info(path, name, entry, base, size) for name, entry in header.items()}
    return ShardHeader(path, tensors, metadata)


def _tensor_info(path: Path, name: str, entry: Any, base: int, size: int) -> TensorInfo:
    try:
        dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
        start, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path.name}: corrupt header entry for tensor '{name}'") from err
    if base + end > size:
        raise CheckpointError(
            f"{path.name}: tensor '{name}' ends at byte {base + end} but the file has {size} "
            "bytes: the file is truncated", "re-download or re-save this shard")
    expected = math.prod(shape) * ITEM_SIZE[dtype] if dtype in ITEM_SIZE else end - start
    if end - start != expected or start > end:
        raise CheckpointError(f"{path.name}: tensor '{name}' has {end - start} bytes but "
                              f"{dtype}{list(shape)} needs {expected}")
    return TensorInfo(name, dtype, shape, path, base + start, base + end)


class Checkpoint:
    """A checkpoint folder: config.json plus safetensors shards (with or without an index).

    Opening reads only headers. `read()` maps one tensor lazily; `read_rows()` reads a subset
    of a fused tensor along axis 0.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = load_config(self.folder)
        self.shards = self._load_shards()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            self.tensors.update(shard.tensors)
        self._handles: dict[Path, Any] = {}

    def _load_shards(self) -> list[ShardHeader]:
        index_path = self.folder / INDEX_NAME
        if index_path.exists():
            return self._load_indexed(index_path)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelSourceError(f"no *.safetensors files in {self.folder}",
                                   "moekit reads safetensors checkpoints; convert .bin files first")
        shards = [read_header(path) for path in files]
        _check_duplicates(shards)
        return shards

    def _load_indexed(self, index_path: Path) -> list[ShardHeader]:
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{INDEX_NAME} is not a valid index ({err})") from err
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{INDEX_NAME} is not a valid index (weight_map must map "
                                  "tensor names to shard file names)")
        shards = []
        for name in sorted(set(weight_map.values())):
            path = self.folder / name
            if not path.exists():
                count = sum(1 for v in weight_map.values() if v == name)
                raise CheckpointError(f"{INDEX_NAME} names shard '{name}' ({count} tensors), "
                                      "which is missing", "download the missing shard")
            shards.append(read_header(path))
        _check_duplicates(shards)
        for shard in shards:
            for key in shard.tensors:
                if weight_map.get(key) != shard.path.name:
                    raise CheckpointError(f"tensor '{key}' is in {shard.path.name} but {INDEX_NAME}"
                                          f" says {weight_map.get(key, 'nothing')}",
                                          "the index and shards disagree: re-download both")
        by_shard = {s.path.name: s for s in shards}
        for key, name in weight_map.items():
            if key not in by_shard[name].tensors:
                raise CheckpointError(f"tensor '{key}' is listed in {INDEX_NAME} but absent from "
                                      f"{name}", "the shard is incomplete: re-download it")
        return shards

    @property
    def total_bytes(self) -> int:
        """Bytes on disk of all safetensors shards."""
        return sum(s.path.stat().st_size for s in self.shards)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor (memory-mapped; copy it before modifying)."""
        return self._handle(self.tensors[name].shard).get_tensor(name)

    def read_rows(self, name: str, rows: list[int], axis: int = 0) -> torch.Tensor:
        """The given indices of `name` along `axis`, in that order (reads only those bytes)."""
        import torch

        view = self._handle(self.tensors[name].shard).get_slice(name)
        lead = (slice(None),) * axis
        parts = [view[(*lead, slice(r, r + 1))] for r in rows]
        return torch.cat(parts, dim=axis) if parts else view[(*lead, slice(0, 0))]


def load_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, with a clear error when absent or malformed."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise ModelSourceError(f"model folder {folder} does not exist",
                               "pass a checkpoint folder or a Hub repo id such as org/name")
    if not path.exists():
        raise ModelSourceError(f"{folder} has no config.json",
                               "pass the folder that holds config.json and *.safetensors")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelSourceError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ModelSourceError(f"{path} is not a JSON object")
    return config


def _check_duplicates(shards: list[ShardHeader]) -> None:
    seen: dict[str, Path] = {}
    for shard in shards:
        for key in shard.tensors:
            if key in seen:
                raise CheckpointError(f"tensor '{key}' appears in both {seen[key].name} and "
                                      f"{shard.path.name}", "remove the stale shard")
            seen[key] = shard.path
