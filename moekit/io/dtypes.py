"""safetensors dtype names, their sizes, and the matching torch dtypes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ITEM_SIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
    "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}


def to_torch(name: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name."""
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32,
        "U64": torch.uint64, "F8_E8M0": torch.float8_e8m0fnu,
    }
    return table[name]


def from_torch(dtype: torch.dtype) -> str:
    """The safetensors dtype name for a torch dtype."""
    for name in ITEM_SIZE:
        try:
            if to_torch(name) == dtype:
                return name
        except (KeyError, AttributeError):
            continue
    raise ValueError(f"dtype {dtype} has no safetensors name")
