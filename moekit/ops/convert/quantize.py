"""`convert --quantize fp8|mxfp4`. fp8: decoder linear weights stored as FP8 blocks, the way
DeepSeek-V3 and the Qwen3 "-FP8" releases store them (`moekit.formats.fp8_block`: E4M3
`X.weight` [out, in] + float32 `X.weight_scale_inv` [ceil(out/128), ceil(in/128)],
scale_inv = amax / 448).

Which weights: every plain 2-D float `*.weight` inside a decoder layer (`.layers.N.`), except
routers (the family's router keys, `mlp.gate`, `router`, `shared_expert_gate`) and norms;
`experts` keeps only the routed experts' per-expert weights. Embeddings, `lm_head`, norms,
biases and fused 3-D expert stacks stay as they are, and every 2-D weight left unquantized is
named in `modules_to_not_convert` so stock FP8 loaders keep it as a plain linear layer.

mxfp4 (experts only, as gpt-oss ships): every fused, transposed expert stack P [E, in, out]
(gpt-oss `mlp.experts.gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H]) stored as
`P_blocks` [E, out, in/32, 16] + `P_scales` [E, out, in/32] (`formats/mxfp4.encode`, OCP MX);
biases, attention, router, embeddings and `lm_head` stay as they are and are named in
`modules_to_not_convert`. Other layouts (per-expert 2-D weights, fused [E, out, in]) have no
MXFP4 form a loader reads and are refused.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from moekit.errors import InvalidArgumentError
from moekit.families.layout import describe
from moekit.formats import mxfp4
from moekit.formats.fp8_block import SCALE, encode
from moekit.io.reader import Checkpoint
from moekit.io.writer import OutTensor
from moekit.ops.convert.items import FLOATS, Item
from moekit.surgery.experts import read_pieces

if TYPE_CHECKING:
    import torch

BLOCK = (128, 128)
SCOPES = ("linear", "experts")
FORMATS = ("fp8", "mxfp4")
DECODER = re.compile(r"(^|\.)layers\.\d+\.")
NOT_LINEAR = ("mlp.gate.weight", "router.weight", "shared_expert_gate.weight", "norm.weight")


def quantization_config(kept: list[str], method: str = "fp8") -> dict[str, Any]:
    """The `quantization_config` of the output; `kept`: modules left unquantized."""
    if method == "mxfp4":
        return {"quant_method": "mxfp4", "modules_to_not_convert": kept}
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(BLOCK), "modules_to_not_convert": kept}


def chosen(checkpoint: Checkpoint, items: dict[str, Item], scope: str) -> set[str]:
    """Names of the items to quantize (see the module docstring)."""
    if scope not in SCOPES:
        raise InvalidArgumentError(f"--quantize-layers {scope!r} is not a choice",
                                   "use linear or experts")
    layout = describe(checkpoint)
    layers = (*layout.moe_layers, *layout.mtp_layers)
    routers = {k for layer in layers for k in layer.router_keys}
    experts = {k for layer in layers for keys in layer.expert_keys for k in keys}
    names = set()
    for name, item in items.items():
        linear = (not item.quantized and item.dtype in FLOATS and len(item.shape) == 2
                  and name.endswith(".weight") and DECODER.search(name) is not None
                  and name not in routers and not name.endswith(NOT_LINEAR))
        if linear and (scope == "linear" or name in experts):
            names.add(name)
    if not names:
        raise InvalidArgumentError(f"--quantize fp8: no {scope} weight of "
                                   f"{checkpoint.folder.name} can be stored as FP8 blocks "
                                   "(fused 3-D experts are not quantized)",
                                   "convert --experts per-expert first, or use "
                                   "--quantize-layers linear")
    return names


def chosen_mxfp4(checkpoint: Checkpoint, items: dict[str, Item]) -> set[str]:
    """Names of the fused expert stacks to store as MXFP4 (module docstring)."""
    layout = describe(checkpoint)
    spec = layout.family.experts if layout.is_moe else None
    if spec is None or not (spec.fused and spec.transposed):
        family = layout.resolved.family.name
        raise InvalidArgumentError(f"--quantize mxfp4: {family} does not store its experts as "
                                   "fused [E, in, out] stacks (gpt-oss' layout, the one MXFP4 "
                                   "loaders read)", "use --quantize fp8")
    names = set()
    for layer in (*layout.moe_layers, *layout.mtp_layers):
        for key in layer.fused_keys:
            item = items[key]
            if item.quantized or item.dtype not in FLOATS or len(item.shape) != 3:
                continue
            if item.shape[1] % mxfp4.GROUP:
                raise InvalidArgumentError(f"--quantize mxfp4: '{key}' {list(item.shape)} has an "
                                           f"input width that is not a multiple of "
                                           f"{mxfp4.GROUP}")
            names.add(key)
    return names


def mxfp4_tensors(item: Item) -> list[OutTensor]:
    """`P_blocks` and `P_scales` (U8) of one fused expert stack, encoded once."""
    held: dict[str, torch.Tensor] = {}

    def part(which: str) -> torch.Tensor:
        if not held:
            values = read_pieces(item.pieces, item.dtype, item.shape)
            held["blocks"], held["scales"] = mxfp4.encode(values)
        return held.pop(which)

    experts, cols, rows = item.shape
    grid = (experts, rows, cols // mxfp4.GROUP)
    return [OutTensor.computed(item.name + mxfp4.BLOCKS, "U8", (*grid, 16),
                               lambda: part("blocks")),
            OutTensor.computed(item.name + mxfp4.SCALES, "U8", grid, lambda: part("scales"))]


def unquantized_modules(items: dict[str, Item], names: set[str]) -> list[str]:
    """Modules of the 2-D float weights left as they are (`lm_head`, routers, ...)."""
    return sorted(n[: -len(".weight")] for n, item in items.items()
                  if n not in names and n.endswith(".weight") and len(item.shape) == 2
                  and item.dtype in FLOATS and "embed" not in n)


def fp8_tensors(item: Item) -> list[OutTensor]:
    """`weight` (F8_E4M3) and `weight_scale_inv` (F32) of one item, encoded once: the first of
    the two to be written computes both and hands the other over."""
    held: dict[str, torch.Tensor] = {}

    def part(which: str) -> torch.Tensor:
        if not held:
            values = read_pieces(item.pieces, item.dtype, item.shape)
            held["weight"], held["scale"] = encode(values, BLOCK)
        return held.pop(which)

    rows, cols = item.shape
    grid = (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    base = item.name[: -len(".weight")]
    return [OutTensor.computed(item.name, "F8_E4M3", item.shape, lambda: part("weight")),
            OutTensor.computed(base + SCALE, "F32", grid, lambda: part("scale"))]
