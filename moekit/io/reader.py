"""A lazy safetensors checkpoint reader that trusts nothing: the index is checked against the
shard headers, and every tensor's byte range against its file, before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError, ModelSourceError
from moekit.io.header import ShardHeader, TensorInfo, read_header

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
__all__ = ["INDEX_NAME", "Checkpoint", "ShardHeader", "TensorInfo", "load_config", "read_header"]


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
        weight_map = read_index(index_path)
        shards = []
        for name in sorted(set(weight_map.values())):
            path = self.folder / name
            if not path.is_file():
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


def read_index(path: Path) -> dict[str, str]:
    """The weight_map of an index file, checked: tensor names to plain `*.safetensors` file
    names in the same folder (a path, `..` or an absolute name is refused before any open)."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError, OSError) as err:
        reason = "not JSON" if isinstance(err, (ValueError, RecursionError)) else (
            "no weight_map" if isinstance(err, (KeyError, TypeError)) else err.strerror)
        raise CheckpointError(f"{INDEX_NAME} is not a valid index ({reason})",
                              "re-download the index or delete it if there is one shard") from err
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{INDEX_NAME} is not a valid index (weight_map must map "
                              "tensor names to shard file names)")
    for name in set(weight_map.values()):
        if (name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
                or not name.endswith(".safetensors")):
            raise CheckpointError(f"{INDEX_NAME} names shard {name[:100]!r}, which is not a "
                                  ".safetensors file in the checkpoint folder",
                                  "shards must be plain file names beside the index")
    return weight_map


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
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # also UnicodeDecodeError
        where = f" at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise ModelSourceError(f"{path} is not valid JSON{where}",
                               "fix or re-download config.json") from err
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
