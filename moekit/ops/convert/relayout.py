"""Routed experts between the Hub's per-expert keys and transformers 5's fused tensors, as
byte ranges (no value is read or changed).

Per-expert (the family record's `ExpertLayout.projections`, e.g. Mixtral
`block_sparse_moe.experts.{j}.w1/w3/w2.weight`, Qwen `mlp.experts.{j}.gate_proj/up_proj/
down_proj.weight`): gate_j, up_j [I, H], down_j [H, I]. Fused (under the same expert prefix,
as `surgery/experts.py` and layout discovery name them; transformers' conversion mapping renames
the prefix when it loads):

    gate_up_proj [E, 2I, H] = stack_j(concat(gate_j, up_j))   (MergeModulelist + Concatenate)
    down_proj    [E, H, I]  = stack_j(down_j)                  (MergeModulelist)

In row-major bytes both are the concatenation of the experts' tensors in that order, so fusing
is a gather of byte ranges and splitting a slicing of them: a round trip is byte-identical.
"""

from __future__ import annotations

from moekit.errors import InvalidArgumentError, UnsupportedModelError
from moekit.families.layout import ModelLayout, MoeLayer, describe
from moekit.io.dtypes import ITEM_SIZE
from moekit.io.reader import Checkpoint
from moekit.ops.convert.items import Item
from moekit.surgery.experts import byte_piece

LAYOUTS = ("fused", "per-expert")
ROLES = ("gate", "up", "down")


def relayout(checkpoint: Checkpoint, items: dict[str, Item], want: str) -> dict[str, Item]:
    """`items` with every MoE layer's routed experts in layout `want` (fused or per-expert);
    layers already so stored are unchanged."""
    layout = describe(checkpoint)
    if not layout.is_moe:
        raise InvalidArgumentError(f"--experts: {checkpoint.folder} is a dense model "
                                   f"({layout.resolved.family.name}) without experts")
    spec = layout.family.experts
    if spec.fused:
        if want == "per-expert":
            raise UnsupportedModelError(f"--experts per-expert: {layout.family.name} stores its "
                                        "experts fused only (there is no per-expert layout)")
        return items
    for layer in (*layout.moe_layers, *layout.mtp_layers):
        if want == "fused" and layer.expert_keys:
            items = _replace(items, _per_expert_keys(layout, layer), _fuse(layout, layer, items))
        elif want == "per-expert" and layer.fused_keys:
            names = _fused_names(layout, layer)
            items = _replace(items, list(names), _split(layout, layer, items, names))
    return items


def _per_expert_keys(layout: ModelLayout, layer: MoeLayer) -> list[str]:
    """[gate_0, up_0, down_0, gate_1, ...]: every per-expert key of the layer, checked."""
    spec = layout.family.experts
    keys = [layer.prefix + spec.per_expert_key(j, r) for j in range(layer.num_experts)
            for r in ROLES]
    owned = {k for ks in layer.expert_keys for k in ks}
    extra = sorted(owned - set(keys)) or sorted(set(keys) - owned)
    if extra:
        raise UnsupportedModelError(f"--experts: tensor '{extra[0]}' is not a plain gate/up/down "
                                    "projection of a per-expert layout (biases, quantization "
                                    "scales or a missing projection)",
                                    "convert --dtype bf16 first when the experts are quantized")
    return keys


def _fused_names(layout: ModelLayout, layer: MoeLayer) -> tuple[str, str]:
    base = layer.prefix + layout.family.experts.prefixes[0] + "."
    names = (base + "gate_up_proj", base + "down_proj")
    if set(layer.fused_keys) != set(names):
        extra = sorted(set(layer.fused_keys) ^ set(names))[0]
        raise UnsupportedModelError(f"--experts: tensor '{extra}' is not part of a fused "
                                    "gate_up_proj/down_proj pair without biases")
    return names


def _plain(items: dict[str, Item], keys: list[str]) -> list[Item]:
    found = [items[k] for k in keys]
    for item in found:
        if item.quantized:
            raise UnsupportedModelError(f"--experts: '{item.name}' is stored quantized "
                                        f"({item.dtype})", "convert --dtype bf16 first, then "
                                        "--experts")
        if item.dtype != found[0].dtype:
            raise UnsupportedModelError(f"--experts: '{item.name}' is {item.dtype} but "
                                        f"'{found[0].name}' is {found[0].dtype}")
    return found


def _fuse(layout: ModelLayout, layer: MoeLayer, items: dict[str, Item]) -> list[Item]:
    """gate_up_proj [E, 2I, H] and down_proj [E, H, I] from the per-expert items."""
    keys = _per_expert_keys(layout, layer)
    found = _plain(items, keys)
    gate, down = found[0].shape, found[2].shape
    for j in range(layer.num_experts):
        shapes = tuple(found[3 * j + r].shape for r in range(3))
        if shapes != (gate, gate, down) or down != gate[::-1]:
            raise UnsupportedModelError(f"--experts: expert {j} of layer {layer.index} has "
                                        f"shapes {[list(s) for s in shapes]}, expert 0 "
                                        f"{[list(gate), list(gate), list(down)]}")
    count, dtype = layer.num_experts, found[0].dtype
    gate_up_name, down_name = (layer.prefix + layout.family.experts.prefixes[0] + "." + n
                               for n in ("gate_up_proj", "down_proj"))
    gate_up = Item(gate_up_name, (count, 2 * gate[0], gate[1]), dtype,
                   tuple(k for i, k in enumerate(keys) if i % 3 != 2),
                   tuple(p for i, it in enumerate(found) if i % 3 != 2 for p in it.pieces),
                   how="fused")
    downs = Item(down_name, (count, *down), dtype, tuple(keys[2::3]),
                 tuple(p for it in found[2::3] for p in it.pieces), how="fused")
    return [gate_up, downs]


def _split(layout: ModelLayout, layer: MoeLayer, items: dict[str, Item],
           names: tuple[str, str]) -> list[Item]:
    """Per-expert gate_j, up_j [I, H] and down_j [H, I] items sliced from the fused ones."""
    gate_up, down = _plain(items, list(names))
    count, rows, hidden = gate_up.shape
    if len(down.shape) != 3 or rows % 2 or down.shape != (count, hidden, rows // 2):
        raise UnsupportedModelError(f"--experts: '{gate_up.name}' {list(gate_up.shape)} and "
                                    f"'{down.name}' {list(down.shape)} are not [E, 2I, H] and "
                                    "[E, H, I]")
    width, size = rows // 2, ITEM_SIZE[gate_up.dtype]
    block = width * hidden * size  # one [I, H] (or [H, I]) matrix in bytes
    spec = layout.family.experts
    out = []
    for j in range(count):
        for role, source, offset in (("gate", gate_up, 2 * j * block),
                                     ("up", gate_up, (2 * j + 1) * block),
                                     ("down", down, j * block)):
            info = source.pieces[0]
            shape = (width, hidden) if role != "down" else (hidden, width)
            out.append(Item(layer.prefix + spec.per_expert_key(j, role), shape, source.dtype,
                            (source.name,), (byte_piece(info, info.start + offset, block),),
                            how="split"))
    return out


def _replace(items: dict[str, Item], old: list[str], new: list[Item]) -> dict[str, Item]:
    """`items` with the keys `old` removed and `new` put where the first of them was."""
    gone, out = set(old), {}
    for name, item in items.items():
        if name == old[0]:
            out.update((n.name, n) for n in new)
        if name not in gone:
            out[name] = item
    return out
