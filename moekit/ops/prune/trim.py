"""`--keep-params F`: a routed-expert byte budget met by fewer removed experts plus one uniform
narrower expert width, written as a stock checkpoint.

Routed-expert bytes of a layer are proportional to E x I (gate, up and down projections all
scale with the width I). With F the share to keep and s = EXPERT_SHARE, n = round(s (1 - F) E)
experts are removed and every survivor is trimmed to I' = floor(F E I / (E - n)) neurons, so
(E - n) I' <= F E I; I' is rounded down to a multiple of 8 (transformers' grouped_mm kernel needs
16-byte aligned rows). Neurons are chosen per expert by measured contribution and the down
projection is refitted (`compensate.refit_layer(width=I')`); gate/up rows (and their biases)
of the kept neurons are byte-selected, the config's expert width key is set to I'.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from moekit.errors import InvalidArgumentError, UnsupportedModelError
from moekit.io.dtypes import to_torch
from moekit.io.writer import OutTensor
from moekit.ops.prune.rewrite import shape_of

if TYPE_CHECKING:
    import torch

    from moekit.families.layout import ModelLayout, MoeLayer
    from moekit.io.reader import Checkpoint
    from moekit.surgery.plan import PrunePlan

EXPERT_SHARE = 0.5  # half of the reduction by removing experts, half by narrowing them
WIDTH_MULTIPLE = 8


def budget_split(num_experts: int, width: int, keep_params: float, top_k: int,
                 expert_share: float = EXPERT_SHARE) -> tuple[int, int]:
    """(experts removed per layer, new uniform width) for keeping `keep_params` of the bytes."""
    if not 0.0 < keep_params <= 1.0:
        raise InvalidArgumentError(f"--keep-params {keep_params} is outside (0, 1]",
                                   "give the share of routed-expert bytes to keep, e.g. 0.5")
    n_drop = int(math.floor(expert_share * (1 - keep_params) * num_experts + 0.5))
    n_drop = min(n_drop, num_experts - top_k)
    new_width = min(width, int(keep_params * num_experts * width / (num_experts - n_drop)))
    if new_width >= WIDTH_MULTIPLE:  # grouped_mm kernels need 16-byte aligned rows
        new_width -= new_width % WIDTH_MULTIPLE
    if new_width < 1:
        raise InvalidArgumentError(f"--keep-params {keep_params} leaves no neuron per expert")
    return n_drop, new_width


def check_trimmable(layout: ModelLayout) -> None:
    """Refuse families whose shared experts take their width from the routed width key."""
    keys, config = layout.family.keys, layout.config
    shared = any(config.get(k) for k in keys.num_shared)
    if shared and not keys.shared_width:
        raise UnsupportedModelError(f"{layout.family.name}: the shared experts' width is derived "
                                    "from the routed expert width", "use --ratio instead")


def trimmed_tensors(checkpoint: Checkpoint, layout: ModelLayout, plan: PrunePlan,
                    neurons: dict[int, dict[int, torch.Tensor]],
                    weights: dict[int, dict[int, torch.Tensor]]) -> dict[str, OutTensor]:
    """Output tensors replacing every kept expert's projections by their trimmed versions."""
    out: dict[str, OutTensor] = {}
    layers = {layer.index: layer for layer in layout.moe_layers}
    for index, cols in neurons.items():
        layer, kept = layers[index], plan.layer(index).kept
        if layer.expert_keys:
            out.update(_per_expert(checkpoint, layout, layer, kept, cols, weights[index]))
        else:
            out.update(_fused(checkpoint, layout, layer, kept, cols, weights[index]))
    return out


def _per_expert(checkpoint: Checkpoint, layout: ModelLayout, layer: MoeLayer, kept: list[int],
                cols: dict[int, torch.Tensor], weights: dict[int, torch.Tensor]
                ) -> dict[str, OutTensor]:
    names = layout.family.experts.projections
    base = layer.prefix + layout.family.experts.prefixes[0].rstrip(".") + "."
    out = {}
    for e in kept:
        idx = cols[e].tolist()
        for key in layer.expert_keys[e]:
            info = checkpoint.tensors[key]
            name = f"{base}{kept.index(e)}.{key[len(f'{base}{e}.'):]}"
            if key.endswith(f".{names['down']}.weight") and e in weights:
                shape = (shape_of(weights, e)[0], len(idx))
                out[key] = OutTensor.computed(
                    name, info.dtype, shape,
                    lambda e=e, d=to_torch(info.dtype): weights[e][:, cols[e]].to(d))
            elif key.endswith(f".{names['down']}.weight"):  # no refit: its own columns
                out[key] = OutTensor.computed(
                    name, info.dtype, (info.shape[0], len(idx)),
                    lambda k=key, c=cols[e]: checkpoint.read(k).index_select(1, c))
            elif key.endswith((f".{names['gate']}.weight", f".{names['up']}.weight")):
                out[key] = OutTensor.computed(
                    name, info.dtype, (len(idx), *info.shape[1:]),
                    lambda k=key, i=idx: checkpoint.read_rows(k, i))
            else:
                raise UnsupportedModelError(f"cannot trim expert tensor '{key}'",
                                            "use --ratio instead")
    return out


def _fused(checkpoint: Checkpoint, layout: ModelLayout, layer: MoeLayer, kept: list[int],
           cols: dict[int, torch.Tensor], weights: dict[int, torch.Tensor]
           ) -> dict[str, OutTensor]:
    import torch

    spec = layout.family.experts
    transposed, interleaved = spec.transposed, spec.interleaved
    out = {}
    for key in layer.fused_keys:
        info = checkpoint.tensors[key]
        tail = key.rsplit(".", 1)[-1]
        if tail not in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            raise UnsupportedModelError(f"cannot trim fused expert tensor '{key}'",
                                        "use --ratio instead")
        if tail == "down_proj_bias":
            continue  # [E, H]: sliced by the ordinary surgery

        def produce(k: str = key, t: str = tail) -> torch.Tensor:
            rows = checkpoint.read_rows(k, kept)
            parts = []
            for i, e in enumerate(kept):
                c = cols[e]
                if t == "down_proj" and e in weights:
                    w = weights[e][:, c].to(rows.dtype)
                    parts.append(w.T if transposed else w)
                    continue
                if t == "down_proj":  # no refit: its own columns (rows [H, I], or [I, H])
                    parts.append(rows[i].index_select(0 if transposed else 1, c))
                    continue
                inner = rows.shape[-1] if (transposed or t.endswith("bias")) else rows.shape[1]
                half = inner // 2
                idx = torch.stack([2 * c, 2 * c + 1], 1).reshape(-1) if interleaved \
                    else torch.cat([c, half + c])
                axis = 1 if (transposed or t.endswith("bias")) else 0
                parts.append(rows[i].index_select(rows[i].dim() - 1 if axis else 0, idx))
            return torch.stack(parts)

        out[key] = OutTensor.computed(key, info.dtype, _shape(info.shape, tail, transposed,
                                                              len(kept), len(cols[kept[0]])),
                                      produce)
    return out


def _shape(shape: tuple[int, ...], tail: str, transposed: bool, experts: int,
           width: int) -> tuple[int, ...]:
    """The trimmed shape of a fused tensor ([E, 2I, H] -> [E', 2I', H], ...)."""
    out = [experts, *shape[1:]]
    if tail == "gate_up_proj_bias":
        out[1] = 2 * width
    elif tail == "gate_up_proj":
        out[2 if transposed else 1] = 2 * width
    else:
        out[1 if transposed else 2] = width
    return tuple(out)
