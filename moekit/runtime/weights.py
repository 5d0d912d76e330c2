"""Read one module's weights (a decoder layer, the embeddings) straight from the safetensors
shards into the model's in-memory layout.

Names: each checkpoint key is renamed with transformers' own conversion mapping for the model
(`block_sparse_moe.` -> `mlp.`, ...). Keys that transformers *fuses* (per-expert
`experts.{j}.w1/w3/w2`) are fused here: for each source pattern, experts j = 0..E-1 stacked on
axis 0 (MergeModulelist), patterns concatenated on axis 1 (Concatenate), giving
`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`.

Bytes: byte ranges come from the checked reader (`moekit.io.reader.TensorInfo`); each tensor is
read with one `readinto` into its final (preallocated) place, through one plain file handle per
shard per call, closed at once. No memory map is kept, so the resident set holds what was read
and nothing else. A load dtype other than the disk dtype costs one tensor-sized temporary.
For an accelerator the tensors are allocated there and filled through two reused host buffers
(`moekit.runtime.staging`), so no host copy of the layer is made.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError, UnsupportedModelError
from moekit.formats import Logical, decode, logical_tensors
from moekit.io.dtypes import to_torch
from moekit.runtime.staging import Staging

if TYPE_CHECKING:
    import torch

    from moekit.io.reader import Checkpoint, TensorInfo


@dataclass(frozen=True)
class Target:
    """One in-memory tensor and where its bytes lie. `parts[p][j]` is expert j of source
    pattern p for fused targets; a plain target has one part with one tensor. Each part is a
    logical tensor (`moekit.formats`): stored plain, or quantized and decoded on read."""

    name: str
    shape: tuple[int, ...]
    dtype: Any
    parts: tuple[tuple[Logical, ...], ...]
    fused: bool

    @property
    def numel(self) -> int:
        import math

        return math.prod(self.shape)

    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class WeightMap:
    """Every tensor of `model` (a meta skeleton or a loaded model) mapped to checkpoint bytes."""

    def __init__(self, checkpoint: Checkpoint, model: Any):
        self.checkpoint = checkpoint
        expected = {name: t for name, t in model.state_dict(keep_vars=True).items()}
        renamings, converters = _conversions(model)
        grouped: dict[str, dict[int, dict[int, Logical]]] = {}
        fused: set[str] = set()
        self.unused: list[str] = []
        for key, info in logical_tensors(checkpoint).items():
            name, pattern = _rename(key, renamings, converters)
            name = _with_prefix(name, expected, getattr(model, "base_model_prefix", ""))
            if name not in expected:
                self.unused.extend(source.name for source in info.sources)
                continue
            if pattern is None:
                grouped.setdefault(name, {}).setdefault(0, {})[0] = info
                continue
            part, expert = _fused_slot(key, pattern, converters)
            fused.add(name)
            grouped.setdefault(name, {}).setdefault(part, {})[expert] = info
        self.targets: dict[str, Target] = {}
        for name, parts in grouped.items():
            tensor = expected[name]
            ordered = tuple(tuple(parts[p][j] for j in sorted(parts[p])) for p in sorted(parts))
            self.targets[name] = Target(name, tuple(tensor.shape), tensor.dtype, ordered,
                                        name in fused)
            _check_shape(self.targets[name])
        self.missing = [n for n in expected if n not in self.targets]
        self.staging = Staging()

    def under(self, prefix: str) -> list[Target]:
        return [t for n, t in self.targets.items() if n.startswith(prefix)]

    def nbytes(self, prefix: str, exclude: str | None = None) -> int:
        """Bytes in memory (load dtype) of the tensors under `prefix` (minus under `exclude`)."""
        return sum(t.nbytes() for t in self.under(prefix)
                   if exclude is None or not t.name.startswith(exclude))

    def advise(self, names: list[str]) -> None:
        """Ask the kernel to start reading the byte ranges of `names` into the page cache
        (POSIX_FADV_WILLNEED): the next layer's I/O overlaps this layer's compute without the
        process holding a second layer in memory."""
        if not hasattr(os, "posix_fadvise"):
            return
        ranges: dict[Path, list[TensorInfo]] = {}
        for name in names:
            for logicals in self.targets[name].parts:
                for logical in logicals:
                    for info in logical.sources:
                        ranges.setdefault(info.shard, []).append(info)
        for shard, infos in ranges.items():
            try:
                fd = os.open(shard, os.O_RDONLY)
            except OSError:
                continue
            try:
                for info in infos:
                    os.posix_fadvise(fd, info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read(self, names: list[str], device: Any, rows: tuple[int, int] | None = None,
             strip: str = "", staged: bool | None = None) -> dict[str, torch.Tensor]:
        """The tensors `names` (in-memory names) on `device`, keys without `strip`.
        `rows=(a, b)`: only experts a..b-1 (axis 0) of each tensor (expert-group mode).
        `staged` (default: on an accelerator): allocate on `device` and fill through the
        staging buffers instead of reading into host tensors and copying them over."""
        import torch

        staged = torch.device(device).type != "cpu" if staged is None else staged
        by_shard: dict[Path, list[tuple[Target, int, int, TensorInfo]]] = {}
        out = {}
        for name in names:
            target = self.targets[name]
            out[name] = _empty(target, rows, device if staged else "cpu")
            for p, logicals in enumerate(target.parts):
                for j, logical in enumerate(logicals):
                    if logical.quantized:
                        _decode_into(logical, out[name], target, p, j, rows)
                    else:
                        info = logical.sources[0]
                        by_shard.setdefault(info.shard, []).append((target, p, j, info))
        with self.staging.lock if staged else _nothing():
            for shard, items in by_shard.items():
                with open(shard, "rb", buffering=0) as handle:
                    for target, p, j, info in items:
                        dest = _destination(out[target.name], target, p, j, rows)
                        if dest is None:
                            continue
                        if staged:
                            self._stage(handle, info, dest, target, rows)
                        else:
                            _read_into(handle, info, dest, target, rows)
        return {name[len(strip):]: tensor.to(device) for name, tensor in out.items()}

    def _stage(self, handle: Any, info: TensorInfo, dest: torch.Tensor, target: Target,
               rows: tuple[int, int] | None) -> None:
        """Fill `dest` (on its device) through the staging buffers; a disk dtype other than
        the load dtype is converted on the device."""
        import torch

        start, count = _byte_range(info, target, rows)
        disk = to_torch(info.dtype)
        raw = dest if disk == dest.dtype else torch.empty(dest.shape, dtype=disk,
                                                          device=dest.device)
        if raw.numel() == 0:
            return
        data = raw.view(-1).view(torch.uint8)
        if data.numel() != count:
            raise CheckpointError(f"{Path(info.shard).name}: '{info.name}' holds {count} bytes, "
                                  f"its place in the model {data.numel()}",
                                  "the config and the weights disagree")
        self.staging.fill(handle, start, count, data, info.name)
        if raw is not dest:
            dest.copy_(raw)


def _conversions(model: Any) -> tuple[list[Any], list[Any]]:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # an older transformers: names on disk must equal names in memory
        return [], []
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    for conv in converters:
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in conv.operations]
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            raise UnsupportedModelError(
                f"streaming cannot fuse {conv.source_patterns} -> {conv.target_patterns} "
                f"(operations {ops})", "run in memory: raise --max-memory above the checkpoint")
    return renamings, converters


def _rename(key: str, renamings: list[Any], converters: list[Any]) -> tuple[str, str | None]:
    from transformers.core_model_loading import rename_source_key

    if not renamings and not converters:
        return key, None
    return rename_source_key(key, renamings, converters)


def _with_prefix(name: str, expected: dict[str, Any], base: str) -> str:
    if name in expected or not base:
        return name
    if name.startswith(base + ".") and name[len(base) + 1:] in expected:
        return name[len(base) + 1:]
    return f"{base}.{name}" if f"{base}.{name}" in expected else name


def _fused_slot(key: str, pattern: str, converters: list[Any]) -> tuple[int, int]:
    """(source pattern index, expert index) of a per-expert key."""
    for conv in converters:
        if pattern in conv.source_patterns:
            regex = re.escape(pattern.lstrip("^")).replace(r"\*", r"(\d+)")
            match = re.search(regex, key)
            if match:
                return conv.source_patterns.index(pattern), int(match.group(1))
    raise CheckpointError(f"cannot tell which expert '{key}' holds (pattern {pattern})")


def _check_shape(target: Target) -> None:
    first = target.parts[0][0]
    if not target.fused:
        if tuple(first.shape) != target.shape:
            raise CheckpointError(f"'{first.name}' has shape {list(first.shape)} but the model "
                                  f"expects {list(target.shape)} for '{target.name}'",
                                  "the config and the weights disagree")
        return
    rows = sum(p[0].shape[0] for p in target.parts)
    shape = (len(target.parts[0]), rows, *first.shape[1:])
    if shape != target.shape or any(len(p) != shape[0] for p in target.parts):
        raise CheckpointError(f"experts fused into '{target.name}' give {list(shape)}, "
                              f"the model expects {list(target.shape)}",
                              "the config's expert count or widths disagree with the weights")


def _empty(target: Target, rows: tuple[int, int] | None, device: Any = "cpu") -> torch.Tensor:
    import torch

    shape = list(target.shape)
    if rows is not None:
        shape[0] = rows[1] - rows[0]
    return torch.empty(shape, dtype=target.dtype, device=device)


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


def _byte_range(info: TensorInfo, target: Target, rows: tuple[int, int] | None
                ) -> tuple[int, int]:
    """(start, count) in the shard of what `info` contributes: rows a..b of a plain target
    (expert-group mode), else the whole tensor."""
    if rows is not None and not target.fused:
        row_bytes = info.nbytes // info.shape[0]
        return info.start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
    return info.start, info.nbytes


def _destination(tensor: torch.Tensor, target: Target, part: int, expert: int,
                 rows: tuple[int, int] | None) -> torch.Tensor | None:
    """Where source (part, expert) goes in the (possibly row-sliced) output tensor."""
    if not target.fused:
        return tensor
    first = rows[0] if rows is not None else 0
    if rows is not None and not rows[0] <= expert < rows[1]:
        return None
    offset = sum(p[0].shape[0] for p in target.parts[:part])
    width = target.parts[part][expert].shape[0]
    return tensor[expert - first, offset:offset + width]


def _read_into(handle: Any, info: TensorInfo, dest: torch.Tensor, target: Target,
               rows: tuple[int, int] | None) -> None:
    """Fill `dest` (contiguous) from the file: rows a..b of a plain target read as one range."""
    import torch

    start, count = _byte_range(info, target, rows)
    disk = to_torch(info.dtype)
    buffer = dest if disk == dest.dtype else torch.empty(dest.shape, dtype=disk)
    raw = buffer.view(-1).view(torch.uint8).numpy() if buffer.numel() else None
    if raw is not None:
        handle.seek(start)
        if handle.readinto(memoryview(raw)) != count or raw.nbytes != count:
            raise CheckpointError(f"{Path(info.shard).name}: short read of '{info.name}'",
                                  "the shard is truncated: re-download it")
    if buffer is not dest:
        dest.copy_(buffer)


def _decode_into(logical: Logical, tensor: torch.Tensor, target: Target, part: int, expert: int,
                 rows: tuple[int, int] | None) -> None:
    """Decode a quantized part into its place in `tensor` (on the tensor's device): its stored
    tensors are read (rows a..b of each for a row-sliced plain target) and dequantized."""
    dest = _destination(tensor, target, part, expert, rows)
    if dest is None or dest.numel() == 0:
        return
    stored = [_read_stored(info, target, rows).to(dest.device) for info in logical.sources]
    values = decode(logical, stored)
    if tuple(values.shape) != tuple(dest.shape):
        raise CheckpointError(f"'{logical.name}' decodes to {list(values.shape)}, its place in "
                              f"the model is {list(dest.shape)}",
                              "the config and the weights disagree")
    dest.copy_(values)


def _read_stored(info: TensorInfo, target: Target, rows: tuple[int, int] | None) -> torch.Tensor:
    """One stored tensor (rows a..b on axis 0 for a row-sliced plain target) in its disk dtype."""
    import torch

    start, count = _byte_range(info, target, rows)
    shape = list(info.shape)
    if rows is not None and not target.fused:
        shape[0] = rows[1] - rows[0]
    tensor = torch.empty(shape, dtype=to_torch(info.dtype))
    raw = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
    if raw is not None:
        with open(info.shard, "rb", buffering=0) as handle:
            handle.seek(start)
            if handle.readinto(memoryview(raw)) != count:
                raise CheckpointError(f"{Path(info.shard).name}: short read of '{info.name}'",
                                      "the shard is truncated: re-download it")
    return tensor
