"""Expert tensors read from, and written back into, the format the source stores them in.

A quantized checkpoint stores each logical tensor (`moekit.formats.Logical`: what an
unquantized checkpoint holds under that name) as several stored tensors. Experts that merge or a
refit changes are computed in float32 from the decoded values and written back *re-encoded in
the source's format*, under the names the source uses:

    FP8 block  X.weight (E4M3) + X.weight_scale_inv: `fp8_block.encode` with the source's block
               and scale dtype (new block scales, amax / 448)
    MXFP4      P_blocks + P_scales: `mxfp4.encode` (OCP MX: shared exponent floor(log2 amax) - 2,
               E2M1 round to nearest even)
    plain      cast to the stored dtype

A stored name is the new logical name plus the source's suffix (`X.weight` + `_scale_inv`,
`P` + `_blocks`). Experts that do not change stay byte copies (rows of fused stacks included).
compressed-tensors modules are not re-encoded (the library's observers are not part of its
decompression path): changed experts in that format are refused with the fix, unless the
caller writes them as bf16 (`merge --bf16-experts`), naming their modules in the config's
quantization (`keep_unquantized`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moekit.errors import UnsupportedModelError
from moekit.formats import decode, fp8_block, mxfp4
from moekit.formats.spec import PLAIN, Logical
from moekit.io.dtypes import to_torch
from moekit.io.header import TensorInfo
from moekit.io.writer import OutTensor

if TYPE_CHECKING:
    import torch


def plain(info: TensorInfo) -> Logical:
    """A plain stored tensor as its own logical tensor."""
    return Logical(info.name, tuple(info.shape), PLAIN, (info,))


def stored_name(logical: Logical, source: TensorInfo, name: str) -> str:
    """The name of stored tensor `source` of `logical` when the logical tensor is `name`."""
    return name + source.name[len(logical.name):]


def check_writable(logical: Logical) -> None:
    """Refuse a logical tensor whose values cannot be written back in its stored format."""
    if not logical.quantized:
        return
    if logical.format == mxfp4.NAME:
        return
    if logical.format == fp8_block.NAME and logical.sources[0].dtype == "F8_E4M3" and \
            logical.sources[1].dtype in ("F32", "BF16", "F16"):
        return
    raise UnsupportedModelError(
        f"'{logical.name}' is stored as {logical.format} ({logical.sources[0].dtype}), which "
        "moekit cannot re-encode after changing it (it writes FP8-block E4M3 with float "
        "scales, and MXFP4)",
        "convert the checkpoint with `moekit convert --dtype bf16` first")


def encoded(logical: Logical, name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """{stored name: tensor} storing float `values` (the logical shape, possibly with another
    size of axis 0 for fused stacks) under logical `name` as `logical` is stored."""
    check_writable(logical)
    if not logical.quantized:
        return {name: values.to(to_torch(logical.sources[0].dtype))}
    if logical.format == mxfp4.NAME:
        parts = mxfp4.encode(values)
    else:
        scale_info = logical.sources[1]
        weight, scale = fp8_block.encode(values, tuple(logical.block),  # type: ignore[arg-type]
                                         to_torch(scale_info.dtype))
        if values.dim() == 2 and scale.numel() == math.prod(scale_info.shape):
            scale = scale.reshape(scale_info.shape)  # one scale per matrix, stored [] or [1]
        parts = (weight, scale)
    return {stored_name(logical, s, name): p for s, p in zip(logical.sources, parts, strict=False)}


def byte_piece(info: TensorInfo, start: int, count: int) -> TensorInfo:
    """Bytes [start, start + count) of `info`'s shard, as a shapeless TensorInfo piece."""
    return TensorInfo(info.name, info.dtype, (), info.shard, start, start + count)


def read_pieces(pieces: tuple[TensorInfo, ...], dtype: str, shape: tuple[int, ...]
                ) -> torch.Tensor:
    """The concatenated byte ranges `pieces` (any shards) as one tensor of safetensors `dtype`
    and `shape`, in its stored dtype, read with plain file reads (no memory map)."""
    import torch

    buffer = bytearray(sum(p.nbytes for p in pieces))
    view, offset = memoryview(buffer), 0
    for piece in pieces:
        with open(piece.shard, "rb", buffering=0) as handle:
            handle.seek(piece.start)
            count = piece.nbytes
            while count:
                got = handle.readinto(view[offset:offset + count])
                if not got:
                    raise OSError(f"{piece.shard.name} ended while reading '{piece.name}'")
                offset, count = offset + got, count - got
    if not buffer:
        return torch.empty(shape, dtype=to_torch(dtype))
    return torch.frombuffer(buffer, dtype=to_torch(dtype)).reshape(shape)


def read_stored(info: TensorInfo, rows: list[int] | None = None) -> torch.Tensor:
    """`info` (or its rows `rows` on axis 0) in its stored dtype, with plain file reads."""
    row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
    pieces = (info,) if rows is None else tuple(
        byte_piece(info, info.start + r * row_bytes, row_bytes) for r in rows)
    shape = info.shape if rows is None else (len(rows), *info.shape[1:])
    return read_pieces(pieces, info.dtype, tuple(shape))


def read_values(logical: Logical, rows: list[int] | None = None) -> torch.Tensor:
    """float32 values of `logical` (rows `rows` of axis 0 for fused stacks), decoded."""
    stored = [read_stored(s, rows) for s in logical.sources]
    return decode(logical, stored).float()


def stored_outputs(logical: Logical, name: str, produce: Callable[[], torch.Tensor]
                   ) -> dict[str, OutTensor]:
    """{source key: output tensor} writing `produce()` (float32 logical values) under logical
    `name` in `logical`'s stored format (same shapes), encoded once for all its stored
    tensors."""
    check_writable(logical)
    names = {s.name: stored_name(logical, s, name) for s in logical.sources}
    return _computed_once(logical, names, None, lambda: encoded(logical, name, produce()))


def _computed_once(logical: Logical, names: dict[str, str], rows: int | None,
                   compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, OutTensor]:
    """One output tensor per stored tensor of `logical` (`names`: source key -> output name;
    `rows`: new size of axis 0), all taken from one `compute()` {output name: tensor} made
    when the first is written and released as each is."""
    held: dict[str, torch.Tensor] = {}

    def part(key: str) -> torch.Tensor:
        if not held:
            held.update(compute())
        return held.pop(key)

    return {s.name: OutTensor.computed(
        names[s.name], s.dtype, tuple(s.shape) if rows is None else (rows, *s.shape[1:]),
        lambda k=names[s.name]: part(k)) for s in logical.sources}


def replaced_rows(logical: Logical, rows: list[int], new: dict[int, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """{source key: stored tensor} of a fused stack holding the stored rows `rows` (axis 0,
    bytes as they are), except positions `new` {position: float32 logical values of one
    expert}, re-encoded in the stored format."""
    stored = {s.name: read_stored(s, rows).clone() for s in logical.sources}
    for position, values in new.items():
        parts = encoded(logical, logical.name, values[None])
        for source in logical.sources:
            stored[source.name][position] = parts[source.name][0]
    return stored


def rows_replaced(logical: Logical, kept: list[int], new: Callable[[], dict[int, torch.Tensor]]
                  ) -> dict[str, OutTensor]:
    """{source key: output tensor} of a fused stack keeping rows `kept` as stored, except the
    positions of `new()` (`replaced_rows`), computed once when the first is written."""
    check_writable(logical)
    names = {s.name: s.name for s in logical.sources}
    return _computed_once(logical, names, len(kept),
                          lambda: replaced_rows(logical, kept, new()))


def keep_unquantized(config: dict[str, Any], modules: list[str]) -> list[str]:
    """Name `modules` (expert modules written dequantized, e.g. `model.layers.1.mlp.experts`)
    in `config`'s `quantization_config` so that stock loaders keep them as plain layers: the
    `modules_to_not_convert` list of FP8 and MXFP4 configs, the `ignore` list of
    compressed-tensors ones (as `re:` patterns of the modules' children). Changes `config` in
    place; returns the config keys changed."""
    quantization = config.get("quantization_config")
    if not modules or not isinstance(quantization, dict):
        return []
    if quantization.get("quant_method") == "compressed-tensors":
        key, new = "ignore", [f"re:^{re.escape(m)}\\." for m in modules]
    else:
        key, new = "modules_to_not_convert", list(modules)
    listed = list(quantization.get(key) or [])
    quantization[key] = listed + [m for m in new if m not in listed]
    return [f"quantization_config.{key}"]


def describe_format(logical: Logical) -> str:
    """How a changed tensor was written: 're-encoded as fp8-block' or the plain dtype."""
    return f"re-encoded as {logical.format}" if logical.quantized else logical.sources[0].dtype
