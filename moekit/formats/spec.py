"""The logical tensor record shared by every stored format."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moekit.io.header import TensorInfo

PLAIN = "plain"


@dataclass(frozen=True)
class Logical:
    """One logical tensor: `name` and `shape` as an unquantized checkpoint would store it,
    decoded from `sources` (stored tensors; the values first, then their scales) by the format
    `format` (`plain`: one source, used as is). `block` is the format's block shape (FP8: rows
    x columns one scale covers; MXFP4: (1, 32)). compressed-tensors modules also carry their
    local parameter names (`params`, in `sources` order) and quantization `scheme`."""

    name: str
    shape: tuple[int, ...]
    format: str
    sources: tuple[TensorInfo, ...]
    block: tuple[int, ...] = ()
    params: tuple[str, ...] = ()
    scheme: Any = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def quantized(self) -> bool:
        return self.format != PLAIN

    @property
    def stored_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources)
