"""The output tensors of a conversion, before and after the dtype is chosen.

An `Item` is one output tensor named as an unquantized checkpoint would name it: either a
quantized logical tensor (`moekit.formats`: FP8 values + block scales, MXFP4 blocks + scales),
decoded to float32 and cast when its turn comes, or the concatenation of byte ranges of plain
stored tensors (a whole tensor; or experts fused / split, `relayout.py`). Casting is element by
element, so it commutes with that concatenation:

    out = cast(decode(stored))                     quantized
    out = cast(concat(bytes of pieces as dtype))   plain; a byte copy when the dtype is kept
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from moekit.formats import Logical, decode, logical_tensors
from moekit.formats.fp8_block import INPUT_SCALE
from moekit.formats.fp8_block import NAME as FP8
from moekit.io.dtypes import to_torch
from moekit.io.header import TensorInfo
from moekit.io.writer import OutTensor
from moekit.surgery.experts import read_pieces

if TYPE_CHECKING:
    import torch

    from moekit.io.reader import Checkpoint

FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
DTYPES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16",
          "fp32": "F32", "float32": "F32"}
CONFIG_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class Item:
    """One output tensor: `name`, logical `shape`, and where its values come from (`logical`
    when quantized, else the byte ranges `pieces`, all of stored `dtype`, concatenated).
    `inputs`: the stored keys it consumes; `extras`: stored tensors that travel with a
    quantized one (FP8 `input_scale`): copied when it is kept, dropped when it is decoded;
    `how`: what was done (copied, fused, split)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    inputs: tuple[str, ...]
    pieces: tuple[TensorInfo, ...] = ()
    logical: Logical | None = None
    how: str = "copied"
    extras: tuple[TensorInfo, ...] = ()

    @property
    def first(self) -> TensorInfo:
        """The stored bytes it starts with (output order follows the source's)."""
        return self.logical.sources[0] if self.logical is not None else self.pieces[0]

    @property
    def quantized(self) -> bool:
        return self.logical is not None


def checkpoint_items(checkpoint: Checkpoint) -> dict[str, Item]:
    """One item per logical tensor of `checkpoint`, by name, in stored order (headers only)."""
    items: dict[str, Item] = {}
    for name, logical in logical_tensors(checkpoint).items():
        inputs = tuple(s.name for s in logical.sources)
        if logical.quantized:
            base = logical.sources[0].name.removesuffix(".weight")
            extras = tuple(checkpoint.tensors[k] for k in (base + INPUT_SCALE,)
                           if logical.format == FP8 and k in checkpoint.tensors)
            items[name] = Item(name, logical.shape, logical.format,
                               inputs + tuple(e.name for e in extras), logical=logical,
                               extras=extras)
        else:
            info = logical.sources[0]
            items[name] = Item(name, tuple(info.shape), info.dtype, inputs, pieces=(info,))
    return items


def out_tensors(item: Item, dtype: str | None) -> tuple[list[OutTensor], str]:
    """The output tensors of `item` with floats in safetensors `dtype` (None: kept as stored,
    quantized tensors too), and what happened: copied, cast, dequantized, or `item.how`."""
    if item.logical is not None:
        if dtype is None:
            return [OutTensor.copy(s) for s in (*item.logical.sources, *item.extras)], "copied"
        logical = item.logical
        return [OutTensor.computed(item.name, dtype, item.shape,
                                   lambda: _decoded(logical, dtype))], "dequantized"
    target = dtype if dtype is not None and item.dtype in FLOATS else item.dtype
    if target != item.dtype:
        return [OutTensor.computed(item.name, target, item.shape,
                                   lambda: _cast(item, target))], "cast"
    whole = len(item.pieces) == 1 and item.pieces[0].shape == item.shape
    if whole:
        return [OutTensor.copy(item.pieces[0], item.name)], item.how
    return [OutTensor.gather(item.name, item.dtype, item.shape, item.pieces)], item.how


def _decoded(logical: Logical, dtype: str) -> torch.Tensor:
    """float32 values of a quantized logical tensor (its stored tensors read whole), cast."""
    stored = [read_pieces((s,), s.dtype, tuple(s.shape)) for s in logical.sources]
    return decode(logical, stored).to(to_torch(dtype))


def _cast(item: Item, dtype: str) -> torch.Tensor:
    return read_pieces(item.pieces, item.dtype, item.shape).to(to_torch(dtype))
