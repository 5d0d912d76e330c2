"""Refitted expert weights as output tensors, in the source's dtype and on-disk layout.

`fits` give new down projections W [H, I] (float32, math orientation y = W h) for some kept
experts (a mapping per layer; read only when the tensor is written, so refits spilled to disk,
`runtime.spill`, come back one at a time). Per-expert checkpoints get the expert's
`...{down}.weight` [H, I] replaced (under its new id); fused checkpoints get the kept rows of
the fused down tensor ([E', H, I], or [E', I, H] when transposed) with the refitted experts'
rows replaced. Everything else stays a
byte copy. Quantized experts (FP8 blocks, MXFP4) are written re-encoded in their stored format
with new scales (`surgery/stored.py`), the other rows of a fused stack kept as stored bytes.
Refitted router rows (`router_fit`) replace the kept rows of the router weight [E', H]
(and bias). Each modified tensor is reported with its relative change ||W - W0|| / ||W0||.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moekit.errors import UnsupportedModelError
from moekit.io.dtypes import to_torch
from moekit.io.writer import OutTensor
from moekit.surgery.experts import ExpertFormat, join_halves, writable_format
from moekit.surgery.stored import describe_format, rows_replaced, stored_outputs
from moekit.surgery.tensors import renamed_expert_key

if TYPE_CHECKING:
    import torch

    from moekit.families.layout import ModelLayout, MoeLayer
    from moekit.io.reader import Checkpoint
    from moekit.layerfit.reconstruct import GateUp
    from moekit.layerfit.router_fit import RouterFit
    from moekit.surgery.plan import PrunePlan


def modified_tensors(checkpoint: Checkpoint, layout: ModelLayout, plan: PrunePlan,
                     weights: dict[int, dict[int, torch.Tensor]],
                     rel_change: dict[int, dict[int, float]],
                     routers: dict[int, RouterFit] | None = None,
                     gate_up: dict[int, dict[int, GateUp]] | None = None
                     ) -> tuple[dict[str, OutTensor], list[dict[str, Any]]]:
    """({source key: OutTensor replacing its normal output}, provenance rows); `routers`
    {layer: refitted router rows} replace the kept rows of the router weight (and bias);
    `gate_up` {layer: {expert: GateUp}} the reconstructed experts' gate and up projections
    (`reconstruct`). Quantized experts are re-encoded in their stored format
    (`surgery/stored.py`; the row says `stored`)."""
    out, rows = router_tensors(checkpoint, layout, plan, routers or {})
    for index, pairs in sorted((gate_up or {}).items()):
        kept = plan.layer(index).kept
        for e, key, tensors, how in gate_up_tensors(checkpoint, layout, plan, index, pairs):
            out.update(tensors)
            rows.append({"layer": index, "expert": e, "new_id": kept.index(e), "tensor": key,
                         "rel_change": round(pairs[e].rel_change, 6), "reconstructed": True,
                         "stored": how})
    layers = {layer.index: layer for layer in layout.moe_layers}
    for index, per_expert in sorted(weights.items()):
        if not per_expert:
            continue
        layer, kept = layers[index], plan.layer(index).kept
        fmt = writable_format(layout, layer, checkpoint)
        if not fmt.fused:
            found = _per_expert(checkpoint, layout, fmt, layer, kept, per_expert)
        else:
            found = _fused(checkpoint, layout, fmt, layer, kept, per_expert)
        for e, key, tensors, how in found:
            out.update(tensors)
            rows.append({"layer": index, "expert": e, "new_id": kept.index(e), "tensor": key,
                         "rel_change": round(rel_change[index][e], 6), "stored": how})
    return out, rows


def router_tensors(checkpoint: Checkpoint, layout: ModelLayout, plan: PrunePlan,
                   routers: dict[int, RouterFit]
                   ) -> tuple[dict[str, OutTensor], list[dict[str, Any]]]:
    """The kept rows of refitted router weights [E', H] (and biases [E']), source dtype."""
    out: dict[str, OutTensor] = {}
    rows: list[dict[str, Any]] = []
    layers = {layer.index: layer for layer in layout.moe_layers}
    spec = layout.family.router
    for index, fit in sorted(routers.items()):
        layer, kept = layers[index], plan.layer(index).kept
        for part, name in enumerate((spec.weight, spec.bias)):
            key = layer.prefix + name if name else ""
            if part == 1 and key not in checkpoint.tensors:
                continue
            info = checkpoint.tensors[key]
            if info.shape[0] != layer.num_experts or len(info.shape) != 2 - part:
                raise UnsupportedModelError(f"router tensor '{key}' is {list(info.shape)}, "
                                            "not one row per expert", "use --no-refit-router")
            shape = (len(kept), *info.shape[1:])
            dtype = to_torch(info.dtype)
            out[key] = OutTensor.computed(
                key, info.dtype, shape,
                lambda f=fit, p=part, k=kept, d=dtype: _router_rows(f, p, k).to(d))
            rows.append({"layer": index, "tensor": key, "rel_change": round(fit.rel_change, 6),
                         "router_fit": fit.method, "alpha": fit.alpha,
                         "held_out_error": [round(fit.held_before, 6),
                                            round(fit.held_after, 6)]})
    return out, rows


def _router_rows(fit: RouterFit, part: int, kept: list[int]) -> torch.Tensor:
    import torch

    tensor = fit.tensors()[part]
    if tensor is None:
        raise UnsupportedModelError("a router bias was refitted but is not stored "
                                    "(internal error)")
    return tensor.index_select(0, torch.as_tensor(kept)).contiguous()


def shape_of(weights: Any, e: int) -> tuple[int, ...]:
    """Shape of refit `e` (read from the spill header when the refits lie on disk)."""
    lazy = getattr(weights, "shape_of", None)
    return tuple(lazy(e)) if lazy is not None else tuple(weights[e].shape)


def _per_expert(checkpoint: Checkpoint, layout: ModelLayout, fmt: ExpertFormat,
                layer: MoeLayer, kept: list[int], weights: dict[int, torch.Tensor]
                ) -> list[tuple[int, str, dict[str, OutTensor], str]]:
    assert fmt.per_expert is not None
    found = []
    for e in weights:
        key = fmt.per_expert["down"][e]
        logical = fmt.stored(key, checkpoint.tensors.get(key))
        shape = shape_of(weights, e)
        if tuple(logical.shape) != shape:
            raise UnsupportedModelError(f"'{key}' is {list(logical.shape)}, the refit gives "
                                        f"{list(shape)}", "use --no-compensate")
        name = renamed_expert_key(layout, key, e, kept.index(e))
        found.append((e, key, stored_outputs(logical, name, lambda e=e: weights[e]),
                      describe_format(logical)))
    return found


def _fused(checkpoint: Checkpoint, layout: ModelLayout, fmt: ExpertFormat, layer: MoeLayer,
           kept: list[int], weights: dict[int, torch.Tensor]
           ) -> list[tuple[int, str, dict[str, OutTensor], str]]:
    key = fmt.down
    assert key is not None
    logical = fmt.stored(key, checkpoint.tensors.get(key))
    transposed = fmt.transposed

    def new() -> dict[int, torch.Tensor]:
        return {kept.index(e): (w.T if transposed else w).float() for e, w in weights.items()}

    tensors = rows_replaced(logical, kept, new)
    return [(e, key, tensors, describe_format(logical)) for e in sorted(weights)]


def gate_up_tensors(checkpoint: Checkpoint, layout: ModelLayout, plan: PrunePlan, index: int,
                    pairs: dict[int, GateUp]) -> list[tuple[int, str, dict[str, OutTensor], str]]:
    """(expert, logical key, {source key: tensor}, how stored) of the gate/up tensors of layer
    `index` holding the reconstructed experts `pairs`, in the source's layout and stored format
    (per-expert keys renamed to the new ids; fused: the kept rows, one tensor for all)."""
    layer = next(m for m in layout.moe_layers if m.index == index)
    kept = plan.layer(index).kept
    fmt = writable_format(layout, layer, checkpoint)
    out: list[tuple[int, str, dict[str, OutTensor], str]] = []
    if fmt.per_expert is not None:
        for e, pair in pairs.items():
            for part, role in enumerate(("gate", "up")):
                key = fmt.per_expert[role][e]
                logical = fmt.stored(key, checkpoint.tensors.get(key))
                name = renamed_expert_key(layout, key, e, kept.index(e))
                out.append((e, key, stored_outputs(
                    logical, name, lambda p=pair, i=part: p.read()[i].float()),
                    describe_format(logical)))
        return out
    key = fmt.gate_up
    assert key is not None
    logical = fmt.stored(key, checkpoint.tensors.get(key))

    def new() -> dict[int, torch.Tensor]:
        joined = {}
        for e, pair in pairs.items():
            gate, up = pair.read()
            value = join_halves(gate[None].float(), up[None].float(), fmt.interleaved)[0]
            joined[kept.index(e)] = value.T if fmt.transposed else value
        return joined

    tensors = rows_replaced(logical, kept, new)
    return [(e, key, tensors, describe_format(logical)) for e in sorted(pairs)]
