"""FP8 with block scales (quant_method "fp8"; DeepSeek-V3/R1, Kimi-K2, GLM-4.5-FP8, MiniMax-M2,
Qwen3-*-FP8).

Stored: `X.weight` [out, in] as F8_E4M3 (or F8_E5M2) and `X.weight_scale_inv`
[ceil(out/bm), ceil(in/bn)] (F32 or BF16), block (bm, bn) = `weight_block_size` (default
128 x 128; a checkpoint without it has one scale per tensor). Optional `X.input_scale`
(static activation scales) are not part of the weight and are dropped when decoding.

    value[i, j] = float32(weight[i, j]) * float32(scale_inv[i // bm, j // bn])

(DeepSeek's `weight_dequant`; transformers' `Fp8Dequantize` computes the same product where
the block divides the shape, and refuses the partial blocks real checkpoints have, e.g.
DeepSeek-V3's kv_a_proj_with_mqa [576, 7168] with scales [5, 56]). Fused 3-D expert tensors
[E, out, in] carry scales [E, ceil(out/bm), ceil(in/bn)].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from moekit.errors import CheckpointError
from moekit.formats.spec import Logical
from moekit.io.header import TensorInfo

if TYPE_CHECKING:
    import torch

NAME = "fp8-block"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE = ".weight_scale_inv"
INPUT_SCALE = ".input_scale"
E4M3_MAX = 448.0


def group(tensors: dict[str, TensorInfo], quantization: dict) -> dict[str, Logical]:
    """Logical tensors of the FP8 weights in `tensors`, keyed by every stored key they use."""
    block = quantization.get("weight_block_size")
    out: dict[str, Logical] = {}
    for key, info in tensors.items():
        if info.dtype not in FP8_DTYPES or not key.endswith(".weight"):
            continue
        base = key[: -len(".weight")]
        scale = tensors.get(base + SCALE)
        if scale is None:
            raise CheckpointError(f"FP8 tensor '{key}' has no '{base + SCALE}'",
                                  "the checkpoint is incomplete: re-download it")
        size = _block(info, scale, block)
        logical = Logical(key, info.shape, NAME, (info, scale), size)
        out[key] = out[scale.name] = logical
        if base + INPUT_SCALE in tensors:
            out[base + INPUT_SCALE] = logical
    return out


def _block(info: TensorInfo, scale: TensorInfo, block: list[int] | None) -> tuple[int, int]:
    rows, cols = info.shape[-2:] if len(info.shape) >= 2 else (1, info.shape[0])
    if block is None:  # one scale per matrix
        size = (rows, cols)
    else:
        size = (int(block[0]), int(block[1]))
    lead = tuple(info.shape[:-2])
    want = (*lead, math.ceil(rows / size[0]), math.ceil(cols / size[1]))
    have = tuple(scale.shape)
    if have != want and not (block is None and math.prod(have) == 1):
        raise CheckpointError(
            f"'{scale.name}' has shape {list(have)}; blocks of {size[0]}x{size[1]} over "
            f"'{info.name}' {list(info.shape)} need {list(want)}",
            "quantization_config.weight_block_size disagrees with the stored scales")
    return size


def decode(logical: Logical, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values [..., out, in] of `weight` with its block scales `scale`."""
    import torch

    bm, bn = logical.block
    values = weight.to(torch.float32)
    rows, cols = values.shape[-2:]
    grid = scale.to(torch.float32).reshape(*values.shape[:-2], *scale.shape[-2:])
    grid = grid.repeat_interleave(bm, dim=-2)[..., :rows, :]
    grid = grid.repeat_interleave(bn, dim=-1)[..., :cols]
    return values.mul_(grid)


def encode(values: torch.Tensor, block: tuple[int, int] = (128, 128),
           scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [..., out, in] values to E4M3 with one scale per `block` of each matrix (amax
    scaling, DeepSeek's `act_quant` for weights): per block b, scale_inv_b = max(amax_b,
    1e-12) / 448 (float32, then rounded to `scale_dtype` when the scales are stored so, e.g.
    bfloat16) and

        weight[..., i, j] = E4M3(value[..., i, j] / scale_inv[..., i // bm, j // bn])

    (round to nearest even, clamped to +-448 so a scale rounded down never overflows).
    Returns (weight [..., out, in] float8_e4m3fn, scale_inv [..., ceil(out/bm), ceil(in/bn)]
    float32 or `scale_dtype`); partial edge blocks take the amax of the values they hold."""
    import torch

    bm, bn = block
    values = values.to(torch.float32)
    *lead, rows, cols = values.shape
    grid_rows, grid_cols = math.ceil(rows / bm), math.ceil(cols / bn)
    padded = values.new_zeros(*lead, grid_rows * bm, grid_cols * bn)
    padded[..., :rows, :cols] = values
    tiles = padded.reshape(*lead, grid_rows, bm, grid_cols, bn)
    scale = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / E4M3_MAX
    if scale_dtype is not None:
        scale = scale.to(scale_dtype)
    quantized = (tiles / scale.float()[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    weight = quantized.to(torch.float8_e4m3fn).reshape(*lead, grid_rows * bm, grid_cols * bn)
    return weight[..., :rows, :cols].contiguous(), scale.contiguous()
