"""Merge surgery on the safetensors files: streamed, one MoE layer's experts at a time.

For every MoE layer whose clusters fold experts together:
- per-expert layouts: new expert i is cluster i; a singleton cluster's tensors are byte copies
  under the new id (as `prune`), a merged cluster's tensors are computed;
- fused layouts: the stacked tensors (and their biases) are computed with E' rows;
- router weight/bias rows and the selection bias: the centres' entries as byte ranges
  (`--router centre`) or usage-weighted averages (`--router usage`).
The layer's experts are read and merged when the writer reaches its first computed tensor and
released after its last, so peak memory is one layer's experts (+ its calibration tokens).
Everything else is copied as bytes; every input tensor must be accounted for before writing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError
from moekit.families.layout import ModelLayout, MoeLayer, describe
from moekit.io.config import write_config
from moekit.io.dtypes import to_torch
from moekit.io.fingerprint import model_fingerprint
from moekit.io.output import copy_aux_files, staged_output
from moekit.io.reader import Checkpoint, TensorInfo
from moekit.io.writer import DEFAULT_SHARD_BYTES, OutTensor, write_checkpoint
from moekit.ops.merge.combine import merge_cluster, merge_rows, reconstruction_error
from moekit.ops.merge.experts import (
    ExpertFormat,
    Experts,
    activation,
    expert_format,
    fused_tensors,
    read_experts,
)
from moekit.ops.merge.plan import MergeLayer, MergePlan, validate_merge_plan
from moekit.ops.prune.surgery import _check_accounted, patch_config, take_rows

if TYPE_CHECKING:
    import torch

    from moekit.ops.merge.calib import LayerCalib

CalibFn = Callable[[int], "LayerCalib | None"]


@dataclass
class MergeResult:
    """What `merge_checkpoint` wrote. `actions` counts input tensors per disposition;
    `reconstruction[layer]` is the mean relative output error of the merged experts on the
    calibration tokens (when there were any)."""

    out: Path
    plan: MergePlan
    bytes_written: int
    tensors_written: int
    actions: dict[str, int]
    config_keys: list[str]
    warnings: list[str] = field(default_factory=list)
    reconstruction: dict[int, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class LayerMerger:
    """Merges one layer's clusters on first use and hands out the resulting tensors once each;
    the layer's weights are dropped after the last one is taken."""

    def __init__(self, checkpoint: Checkpoint, layout: ModelLayout, fmt: ExpertFormat,
                 plan_layer: MergeLayer, method: str, calib: CalibFn | None,
                 errors: dict[int, float]):
        self.checkpoint, self.layout, self.fmt, self.plan_layer = checkpoint, layout, fmt, \
            plan_layer
        self.method, self.calib, self.errors = method, calib, errors
        self.names: set[str] = set()
        self.cache: dict[str, torch.Tensor] | None = None

    def want(self, name: str) -> Callable[[], torch.Tensor]:
        self.names.add(name)
        return lambda: self.take(name)

    def take(self, name: str) -> torch.Tensor:
        if self.cache is None:
            self.cache = self._compute()
        return self.cache.pop(name)  # the layer's tensors are freed as they are written

    def _compute(self) -> dict[str, torch.Tensor]:
        p = self.plan_layer
        merged_ids = sorted({j for c in p.clusters if len(c) > 1 or self.fmt.fused for j in c})
        experts = read_experts(self.checkpoint, self.fmt, merged_ids)
        row = {j: r for r, j in enumerate(merged_ids)}
        calib = self.calib(p.layer) if self.calib and self.method == "fit" else None
        act = activation(self.layout)
        merged: dict[int, Experts] = {}
        errors = []
        for i, (cluster, weights) in enumerate(zip(p.clusters, p.weights, strict=True)):
            if len(cluster) == 1 and not self.fmt.fused:
                continue
            members = experts.select([row[j] for j in cluster])
            gates = calib.gates(cluster) if calib is not None else None
            merged[i] = merge_cluster(members, weights, self.method, act,
                                      calib.inputs if calib is not None else None, gates)
            if calib is not None and len(cluster) > 1:
                errors.append(reconstruction_error(merged[i], experts.select(
                    [row[j] for j in cluster]), calib.inputs, gates, act))
        if errors:
            self.errors[p.layer] = sum(errors) / len(errors)
        return self._tensors(merged)

    def _tensors(self, merged: dict[int, Experts]) -> dict[str, torch.Tensor]:
        import torch

        tensors = self.checkpoint.tensors
        if self.fmt.fused:
            stacked = Experts(*(None if getattr(merged[0], r) is None else torch.cat(
                [getattr(merged[i], r) for i in range(len(merged))]) for r in
                ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")))
            out = fused_tensors(self.fmt, stacked)
            return {k: v.to(to_torch(tensors[k].dtype)) for k, v in out.items()}
        assert self.fmt.per_expert is not None
        out = {}
        for i, expert in merged.items():
            centre = self.plan_layer.clusters[i][0]
            for role in ("gate", "up", "down"):
                key = self.fmt.per_expert[role][centre]
                value = getattr(expert, role)[0]
                out[_renamed(self.layout, key, centre, i)] = value.to(to_torch(
                    tensors[key].dtype)).contiguous()
        return {k: v for k, v in out.items() if k in self.names}


def _renamed(layout: ModelLayout, key: str, old: int, new: int) -> str:
    """`{layer}.{experts}.{old}.w1.weight` -> `{layer}.{experts}.{new}.w1.weight`."""
    base = f".{layout.family.experts.prefixes[0].rstrip('.')}."
    head = f"{base}{old}."
    if head not in key:
        raise CheckpointError(f"expert tensor '{key}' does not contain '{head}'")
    start, end = key.rindex(head), key.rindex(head) + len(head)
    return f"{key[:start]}{base}{new}.{key[end:]}"


def plan_tensors(checkpoint: Checkpoint, layout: ModelLayout, plan: MergePlan,
                 calib: CalibFn | None = None, errors: dict[int, float] | None = None
                 ) -> tuple[list[OutTensor], dict[str, str]]:
    """Output tensors (source byte order) and, for every input key, what happened to it:
    `copied`, `renamed`, `sliced`, `merged` or `folded`. Raises if any key is unaccounted."""
    actions: dict[str, str] = {}
    outputs: dict[str, OutTensor] = {}
    for layer in layout.moe_layers:
        p = plan.layer(layer.index)
        if len(p.clusters) == layer.num_experts:
            continue
        merger = LayerMerger(checkpoint, layout, expert_format(checkpoint, layout, layer), p,
                             plan.method, calib, errors if errors is not None else {})
        for key, action, out in _layer_tensors(checkpoint, layout, layer, p, plan.router,
                                               merger):
            if key in actions:
                raise CheckpointError(f"tensor '{key}' is handled twice by the surgery")
            actions[key] = action
            if out is not None:
                outputs[key] = out
    for key, info in checkpoint.tensors.items():
        if key not in actions:
            actions[key] = "copied"
            outputs[key] = OutTensor.copy(info)
    _check_accounted(checkpoint, actions, outputs)
    order = sorted(checkpoint.tensors.values(), key=lambda i: (str(i.shard), i.start))
    return [outputs[i.name] for i in order if i.name in outputs], actions


def _layer_tensors(checkpoint: Checkpoint, layout: ModelLayout, layer: MoeLayer, p: MergeLayer,
                   router: str, merger: LayerMerger
                   ) -> list[tuple[str, str, OutTensor | None]]:
    tensors = checkpoint.tensors
    result: list[tuple[str, str, OutTensor | None]] = []
    fmt = merger.fmt
    new_count = len(p.clusters)
    if fmt.fused:
        for key in layer.fused_keys:
            info = tensors[key]
            shape = (new_count, *info.shape[1:])
            result.append((key, "merged", OutTensor.computed(key, info.dtype, shape,
                                                             merger.want(key))))
    else:
        assert fmt.per_expert is not None
        new_of = {c[0]: i for i, c in enumerate(p.clusters)}
        for old, keys in enumerate(layer.expert_keys):
            for key in keys:
                if old not in new_of:
                    result.append((key, "folded", None))
                    continue
                i = new_of[old]
                name = _renamed(layout, key, old, i)
                if len(p.clusters[i]) == 1:
                    result.append((key, "renamed", OutTensor.copy(tensors[key], name)))
                else:
                    result.append((key, "merged", OutTensor.computed(
                        name, tensors[key].dtype, tensors[key].shape, merger.want(name))))
    for key in layer.router_keys:
        result.append((key, *_router_tensor(checkpoint, tensors[key], p, router, 0)))
    if layer.selection_bias:
        info = tensors[layer.selection_bias]
        result.append((layer.selection_bias, *_router_tensor(checkpoint, info, p, router,
                                                             len(info.shape) - 1)))
    return result


def _router_tensor(checkpoint: Checkpoint, info: TensorInfo, p: MergeLayer, router: str,
                   axis: int) -> tuple[str, OutTensor]:
    """Router rows / bias entries of the merged experts along `axis`."""
    if router == "centre":
        return "sliced", take_rows(info, p.centres, axis=axis)
    shape = list(info.shape)
    shape[axis] = len(p.clusters)

    def produce() -> torch.Tensor:
        rows = merge_rows(checkpoint.read(info.name), p.clusters, p.weights, axis=axis)
        return rows.to(to_torch(info.dtype))

    return "merged", OutTensor.computed(info.name, info.dtype, tuple(shape), produce)


def merge_checkpoint(source: Path, plan: MergePlan, out: Path, *, overwrite: bool = False,
                     calib: CalibFn | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     ignore_fingerprint: bool = False,
                     on_bytes: Callable[[int, int], None] | None = None,
                     finish: Callable[[Path, MergeResult], None] | None = None) -> MergeResult:
    """Write the merged checkpoint of `source` into `out` (staged: whole or nothing).
    `calib(layer)` gives the layer's calibration tokens (needed by `--method fit`)."""
    checkpoint = Checkpoint(source)
    layout = describe(checkpoint)
    if not layout.is_moe:
        raise CheckpointError(f"{source} is a dense model ({layout.family.name}): nothing to "
                              "merge")
    plan = validate_merge_plan(plan, layout, model_fingerprint(checkpoint, layout),
                               ignore_fingerprint)
    errors: dict[int, float] = {}
    tensors, actions = plan_tensors(checkpoint, layout, plan, calib, errors)
    config, config_keys, warnings = patch_config(checkpoint.config, layout, plan.as_prune_plan())
    metadata: dict[str, str] = {}
    for shard in checkpoint.shards:
        metadata.update(shard.metadata)
    counts = {a: sum(1 for v in actions.values() if v == a) for a in sorted(set(actions.values()))}
    result = MergeResult(Path(out), plan, sum(t.nbytes for t in tensors), len(tensors), counts,
                         config_keys, [*plan.warnings, *warnings], errors)
    total = result.bytes_written
    if on_bytes:
        on_bytes(0, total)
    with staged_output(Path(out), overwrite, inputs=(Path(source),)) as staging:
        write_checkpoint(staging, tensors, max_shard_bytes=max_shard_bytes, metadata=metadata,
                         on_tensor=(lambda t: on_bytes(t.nbytes, total)) if on_bytes else None)
        write_config(config, staging)
        copy_aux_files(Path(source), staging)
        if finish is not None:
            finish(staging, result)
    return result
