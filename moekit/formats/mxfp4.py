"""MXFP4 experts (quant_method "mxfp4"; gpt-oss), per the OCP Microscaling spec.

Stored, for an expert matrix P of gpt-oss (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]
in the unquantized layout): `P_blocks` [E, R, C/32, 16] uint8 and `P_scales` [E, R, C/32]
uint8, where [E, R, C] is P transposed (rows = output features). Each byte holds two E2M1
codes, low nibble first; each group of 32 values shares the E8M0 scale 2^(s - 127):

    value[e, r, 32 g + 2 b + n] = E2M1[nibble n of blocks[e, r, g, b]] * 2^(scales[e, r, g] - 127)
    P = value.transpose(1, 2)          (transformers' `convert_moe_packed_tensors`)

E2M1 codes 0..15: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (bit 3 = sign).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moekit.errors import CheckpointError
from moekit.formats.spec import Logical
from moekit.io.header import TensorInfo

if TYPE_CHECKING:
    import torch

NAME = "mxfp4"
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS, SCALES = "_blocks", "_scales"


def group(tensors: dict[str, TensorInfo], quantization: dict) -> dict[str, Logical]:
    """Logical tensors of the MXFP4 pairs in `tensors`, keyed by every stored key they use."""
    out: dict[str, Logical] = {}
    for key, info in tensors.items():
        if not key.endswith(BLOCKS):
            continue
        name = key[: -len(BLOCKS)]
        scales = tensors.get(name + SCALES)
        if scales is None:
            raise CheckpointError(f"MXFP4 tensor '{key}' has no '{name + SCALES}'",
                                  "the checkpoint is incomplete: re-download it")
        shape = tuple(info.shape)
        if (info.dtype != "U8" or scales.dtype != "U8" or len(shape) != 4 or shape[-1] != 16
                or tuple(scales.shape) != shape[:-1]):
            raise CheckpointError(
                f"'{key}' {info.dtype} {list(shape)} with '{scales.name}' {scales.dtype} "
                f"{list(scales.shape)} is not MXFP4 (blocks [E, R, G, 16] U8, scales [E, R, G] U8)",
                "the checkpoint is damaged or not quantized as its config says")
        experts, rows, groups = shape[:3]
        logical = Logical(name, (experts, groups * 32, rows), NAME, (info, scales), (1, 32))
        out[key] = out[scales.name] = logical
    return out


def decode(logical: Logical, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of the logical tensor [E, C, R] (see the module docstring)."""
    import torch

    table = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    codes = blocks.to(torch.uint8)
    values = torch.stack((table[(codes & 0x0F).long()], table[(codes >> 4).long()]), dim=-1)
    values = values.reshape(*codes.shape[:-1], 32)
    exponents = scales.to(torch.int32) - 127
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(torch.float32))
    return values.reshape(*codes.shape[:2], -1).transpose(1, 2).contiguous()
