"""MXFP4 experts (quant_method "mxfp4"; gpt-oss), per the OCP Microscaling spec.

Stored, for an expert matrix P of gpt-oss (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]
in the unquantized layout): `P_blocks` [E, R, C/32, 16] uint8 and `P_scales` [E, R, C/32]
uint8, where [E, R, C] is P transposed (rows = output features). Each byte holds two E2M1
codes, low nibble first; each group of 32 values shares the E8M0 scale 2^(s - 127):

    value[e, r, 32 g + 2 b + n] = E2M1[nibble n of blocks[e, r, g, b]] * 2^(scales[e, r, g] - 127)
    P = value.transpose(1, 2)          (transformers' `convert_moe_packed_tensors`)

E2M1 codes 0..15: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (bit 3 = sign).

Encoding (`encode`, OCP MX spec v1.0 section 6.3): per group of 32 values with largest
magnitude amax, the shared exponent X = floor(log2(amax)) - 2 (2 = E2M1's largest exponent),
clamped to E8M0's [-127, 127] (an all-zero group takes -127); each value v / 2^X is rounded to
the nearest E2M1 value, ties to the even code, magnitudes above 6 saturating to 6; the sign is
kept (-0 included). Values a group can hold exactly come back unchanged: decode(encode(x)) == x.
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
GROUP = 32
# Rounding thresholds between E2M1 magnitudes k and k + 1 (codes 0..7); a tie goes up where
# the upper code is even (0.75 -> 1.0, 1.75 -> 2.0, 3.5 -> 4.0), else down.
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


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


def encode(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 (blocks [E, R, C/32, 16] uint8, scales [E, R, C/32] uint8) of the logical values
    [E, C, R] (gpt-oss' `gate_up_proj`/`down_proj`), the inverse of `decode` (module docstring).
    """
    import torch

    experts, cols, rows = values.shape
    if cols % GROUP:
        raise CheckpointError(f"MXFP4 needs the input width to be a multiple of {GROUP}, got "
                              f"{list(values.shape)} (gpt-oss layout [E, in, out])")
    matrix = values.to(torch.float32).transpose(1, 2)
    groups = matrix.reshape(experts, rows, cols // GROUP, GROUP)
    amax = groups.abs().amax(dim=-1)
    _, exponent = torch.frexp(amax)  # amax = m 2^e, m in [0.5, 1): floor(log2(amax)) = e - 1
    shared = torch.where(amax > 0, exponent - 3, torch.full_like(exponent, -127))
    shared = shared.clamp(-127, 127)
    scaled = torch.ldexp(groups, (-shared).unsqueeze(-1).to(torch.float32))
    magnitude = scaled.abs()
    codes = torch.zeros_like(magnitude, dtype=torch.uint8)
    for k, edge in enumerate(MIDPOINTS):
        up = magnitude >= edge if k % 2 else magnitude > edge
        codes += up.to(torch.uint8)
    codes |= torch.signbit(scaled).to(torch.uint8) << 3
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (shared + 127).to(torch.uint8).contiguous()
