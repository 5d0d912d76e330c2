"""Quantize a saved tiny checkpoint the way the Hub's quantized releases store it, and
dequantize it back, both written here from the formats' specifications (independent of
moekit.formats):

- FP8 block (DeepSeek-V3 / Qwen3-FP8): every linear weight inside the decoder layers except the
  router is stored as E4M3 `weight` [out, in] with `weight_scale_inv` [ceil(out/bm), ceil(in/bn)]
  float32; value = fp8 * scale_inv of its block; scale_inv = amax(block) / 448.
- MXFP4 (gpt-oss, OCP MX spec): `{proj}_blocks` [E, R, C/32, 16] uint8 (two E2M1 codes per byte,
  low nibble first) and `{proj}_scales` [E, R, C/32] uint8 (E8M0: 2^(s-127)) for the transposed
  expert matrix [E, R, C] = gate_up_proj/down_proj.transpose(1, 2).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _is_fp8_target(key: str, shape: tuple[int, ...]) -> bool:
    inside = ".layers." in key and key.endswith(".weight") and len(shape) == 2
    return inside and not key.endswith(("mlp.gate.weight", "router.weight", "norm.weight"))


def _copy_side_files(src: Path, dst: Path, quantization: dict | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy(path, dst / path.name)
    config = json.loads((src / "config.json").read_text())
    if quantization is None:
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def quantize_fp8_block(src: Path, dst: Path, block: tuple[int, int] = (16, 16)) -> Path:
    """`src` (float checkpoint, one file) -> `dst` stored as FP8 blocks."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    out = {}
    for key, value in tensors.items():
        if not _is_fp8_target(key, tuple(value.shape)):
            out[key] = value
            continue
        rows, cols = value.shape
        grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        scale = torch.empty(grid, dtype=torch.float32)
        q = torch.empty(value.shape, dtype=torch.float8_e4m3fn)
        for i in range(grid[0]):
            for j in range(grid[1]):
                sl = (slice(i * block[0], (i + 1) * block[0]),
                      slice(j * block[1], (j + 1) * block[1]))
                tile = value[sl].float()
                amax = tile.abs().max().clamp(min=1e-12)
                scale[i, j] = amax / 448.0
                q[sl] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
        out[key] = q
        out[key.removesuffix(".weight") + ".weight_scale_inv"] = scale
    _copy_side_files(src, dst, {"quant_method": "fp8", "fmt": "e4m3",
                                "activation_scheme": "dynamic", "weight_block_size": list(block)})
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def dequantize_fp8_block(src: Path, dst: Path) -> Path:
    """FP8-block `src` -> float32 `dst`, element by element from the spec."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    bm, bn = config["quantization_config"]["weight_block_size"]
    tensors = load_file(src / "model.safetensors")
    out = {}
    for key, value in tensors.items():
        if key.endswith(".weight_scale_inv"):
            continue
        scale_key = key.removesuffix(".weight") + ".weight_scale_inv"
        if scale_key in tensors:
            scale = tensors[scale_key].float()
            rows = torch.arange(value.shape[0]) // bm
            cols = torch.arange(value.shape[1]) // bn
            value = value.float() * scale[rows[:, None], cols[None, :]]
        out[key] = value.float() if value.is_floating_point() else value
    _copy_side_files(src, dst, None)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def quantize_mxfp4(src: Path, dst: Path) -> Path:
    """gpt-oss `src` (float, fused experts) -> MXFP4 experts as the Hub stores them."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    out = {}
    for key, value in tensors.items():
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[key] = value
            continue
        blocks, scales = mxfp4_reference(value.float().transpose(1, 2).contiguous())
        out[key + "_blocks"], out[key + "_scales"] = blocks, scales
    _copy_side_files(src, dst, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def mxfp4_reference(matrix):
    """[E, R, C] float -> (blocks [E, R, C/32, 16] u8, scales [E, R, C/32] u8), per the OCP MX
    spec: per 32 values, the shared exponent X = floor(log2(amax)) - 2 (E2M1's largest exponent;
    -127 for an all-zero group, clamped to [-127, 127]); each value / 2^X rounded to the nearest
    E2M1 value (ties to the even code; magnitudes over 6 saturate), its sign kept."""
    import torch

    e, r, c = matrix.shape
    groups = matrix.float().reshape(e, r, c // 32, 32)
    exponents = torch.tensor([
        -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - 2))
        for amax in groups.abs().amax(-1).flatten().tolist()]).reshape(e, r, c // 32)
    scaled = groups * torch.pow(2.0, -exponents.double())[..., None].float()
    grid = torch.tensor(E2M1[:8])
    distance = (scaled.abs()[..., None] - grid).abs()
    nearest = distance.min(-1, keepdim=True).values
    # rank: 0 = nearest with an even code, 1 = nearest with an odd code, 2 = not nearest; a
    # tie between two neighbours thus goes to the even code (round half to even)
    rank = torch.where(distance == nearest, torch.arange(8) % 2, 2)
    codes = rank.argmin(-1)
    codes = codes.to(torch.uint8) | (torch.signbit(scaled).to(torch.uint8) << 3)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exponents + 127).to(torch.uint8).contiguous()


def dequantize_mxfp4(src: Path, dst: Path) -> Path:
    """MXFP4 gpt-oss `src` -> float32 `dst` (experts [E, C, R] as the unquantized layout)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    grid = torch.tensor(E2M1)
    out = {}
    for key, value in tensors.items():
        if key.endswith("_scales"):
            continue
        if key.endswith("_blocks"):
            name = key.removesuffix("_blocks")
            scales = tensors[name + "_scales"].to(torch.int32) - 127
            low, high = grid[(value & 15).long()], grid[(value >> 4).long()]
            values = torch.stack([low, high], -1).reshape(*value.shape[:-1], 32)
            values = values * torch.pow(2.0, scales.float())[..., None]
            matrix = values.reshape(*value.shape[:2], -1)
            out[name] = matrix.transpose(1, 2).contiguous()
            continue
        out[key] = value.float() if value.is_floating_point() else value
    _copy_side_files(src, dst, None)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


W4A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized",
         "quantization_status": "compressed", "ignore": ["lm_head", "re:.*mlp\\.gate$"],
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
             "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
             "group_size": 32}}}}


# llm-compressor's NVFP4 preset as its config.json stores it (FP4 E2M1 values, an FP8 E4M3
# scale per 16 values, a float32 global scale per tensor; activations dynamic)
NVFP4 = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
         "quantization_status": "compressed", "ignore": ["lm_head", "re:.*mlp\\.gate$"],
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
             "num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
             "group_size": 16, "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"},
             "input_activations": {
                 "num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                 "group_size": 16, "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn",
                 "observer": "static_minmax"}}}}


def _library_qparams(value, args):
    """(scale, zero point, global scale or None) of one weight as llm-compressor's min-max
    observer computes them with the library (NVFP4: `generate_gparam`, then per group
    `calculate_qparams`); int groups: amax / 7 per group."""
    import torch
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    grouped = value.float().reshape(value.shape[0], -1, args.group_size)
    if args.type != "float":
        scale = (grouped.abs().amax(-1) / 7).clamp(min=1e-8)
        return scale, torch.zeros_like(scale, dtype=torch.int8), None
    global_scale = generate_gparam(value.float().min(), value.float().max())
    scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args,
                                    global_scale=global_scale)
    return scale, zero, global_scale


def quantize_compressed(src: Path, dst: Path, quantization: dict = W4A16) -> tuple[Path, Path]:
    """`src` -> (`dst`/q: every decoder linear but the router compressed by the
    compressed-tensors library with `quantization`'s one scheme (`_library_qparams`),
    `dst`/deq: the same weights fake-quantized by the library from the float originals, or
    for NVFP4 decompressed by the library's own decompressor)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from safetensors.torch import load_file, save_file

    config = QuantizationConfig.model_validate(quantization)
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config.format)
    tensors = load_file(src / "model.safetensors")
    packed, fake = {}, {}
    for key, value in tensors.items():
        if not _is_fp8_target(key, tuple(value.shape)):
            packed[key] = fake[key] = value
            continue
        scale, zero, global_scale = _library_qparams(value, scheme.weights)
        base = key.removesuffix(".weight")
        state = {"weight": value.float(), "weight_scale": scale}
        if global_scale is not None:
            state["weight_global_scale"] = global_scale
        state = compressor.compress(state, scheme)
        packed.update({f"{base}.{k}": v.contiguous() for k, v in state.items()})
        if global_scale is None:
            fake[key] = fake_quantize(value.float(), scale, zero, scheme.weights)
        else:  # NVFP4: the library's decompression (it computes in bf16; see test_quantized)
            fake[key] = compressor.decompress(state, scheme)["weight"].float()
    q, deq = dst / "q", dst / "deq"
    _copy_side_files(src, q, quantization)
    _copy_side_files(src, deq, None)
    save_file(packed, q / "model.safetensors", metadata={"format": "pt"})
    save_file(fake, deq / "model.safetensors", metadata={"format": "pt"})
    return q, deq


# (family, build(float source, folder) -> (quantized, independent float32 dequantization)):
# deepseek_v3 FP8 with 16x16 blocks, qwen3_moe FP8 with 16x24 blocks (partial blocks at the
# edges, as DeepSeek-V3's [576, 7168] kv_a_proj), gpt_oss MXFP4, qwen3_moe W4A16 stored by the
# compressed-tensors library (its fake-quantization of the float weights is the reference).
def _pair(quantize, dequantize):  # noqa: ANN001, ANN202
    def build(src, root):
        q = quantize(src, root / "q")
        return q, dequantize(q, root / "deq")

    return build


CASES = {
    "deepseek_v3-fp8": ("deepseek_v3", _pair(quantize_fp8_block, dequantize_fp8_block)),
    "qwen3_moe-fp8": ("qwen3_moe", _pair(lambda s, d: quantize_fp8_block(s, d, (16, 24)),
                                         dequantize_fp8_block)),
    "gpt_oss-mxfp4": ("gpt_oss", _pair(quantize_mxfp4, dequantize_mxfp4)),
    "qwen3_moe-w4a16": ("qwen3_moe", quantize_compressed),
    "qwen3_moe-nvfp4": ("qwen3_moe", lambda s, d: quantize_compressed(s, d, NVFP4)),
}
