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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError, InvalidArgumentError
from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import ModelLayout, MoeLayer, describe
from moekit.io.dtypes import to_torch
from moekit.io.output import write_model_folder
from moekit.io.reader import Checkpoint, TensorInfo
from moekit.io.writer import DEFAULT_SHARD_BYTES, OutTensor
from moekit.ops.merge.combine import merge_cluster, merge_rows
from moekit.ops.merge.fit import fit_layer, fit_router
from moekit.ops.merge.plan import (
    FIT_METHODS,
    LAYER_FITS,
    MergeLayer,
    MergePlan,
    validate_merge_plan,
)
from moekit.ops.merge.report import write_merge_records
from moekit.surgery.experts import (
    Experts,
    activation,
    expert_format,
    fused_tensors,
    read_experts,
    stack,
)
from moekit.surgery.tensors import check_accounted, patch_config, renamed_expert_key, take_rows

if TYPE_CHECKING:
    import torch

    from moekit.ops.merge.calib import LayerCalib

CalibFn = Callable[[int], "LayerCalib | None"]
RefitFn = Callable[[int], "Mapping[int, torch.Tensor]"]  # layer -> {centre id: down [H, I]}


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

    def __init__(self, checkpoint: Checkpoint, layout: ModelLayout, layer: MoeLayer,
                 plan: MergePlan, calib: CalibFn | None, errors: dict[int, float],
                 refits: Mapping[int, torch.Tensor] | None = None):
        self.checkpoint, self.layout, self.layer, self.plan = checkpoint, layout, layer, plan
        self.fmt = expert_format(layout, layer)
        self.plan_layer = plan.layer(layer.index)
        self.calib, self.errors, self.refits = calib, errors, refits or {}
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
        p, method = self.plan_layer, self.plan.method
        calibrated = method in FIT_METHODS or self.plan.router == "fit"
        calib = self.calib(p.layer) if self.calib and calibrated else None
        if calibrated and calib is None:
            raise InvalidArgumentError(f"--method {method} --router {self.plan.router} needs "
                                       f"calibration tokens for layer {p.layer}",
                                       "pass --data NAME=PATH")
        router = self._router_rows(calib) if self.plan.router == "fit" else None
        whole = self.fmt.fused or calib is not None or bool(self.refits)
        ids = sorted({j for c in p.clusters if len(c) > 1 or whole for j in c})
        experts = read_experts(self.checkpoint, self.fmt, ids)
        row = {j: r for r, j in enumerate(ids)}
        merged = {i: merge_cluster(experts.select([row[j] for j in c]), w, method)
                  for i, (c, w) in enumerate(zip(p.clusters, p.weights, strict=True))
                  if len(c) > 1 or whole}
        for i, expert in merged.items():  # fit-layer: the centres' refitted down projections
            centre = p.clusters[i][0]
            if centre in self.refits:
                expert.down = self.refits[centre].float().unsqueeze(0)
        if method in FIT_METHODS and calib is not None:
            bias = (self.checkpoint.read(self.layer.selection_bias)
                    if self.layer.selection_bias else None)
            stacked, self.errors[p.layer] = fit_layer(
                experts, stack(list(merged.values())), p, calib, self.layout,
                self.plan.router, self.plan.config_changes, activation(self.layout), bias,
                rows=router)
            merged = {i: stacked.select([i]) for i in merged}
        tensors = self._tensors(merged)
        if router is not None:
            keys = self.layer.router_keys
            tensors[keys[0]] = router[0].to(to_torch(self.checkpoint.tensors[keys[0]].dtype))
            if router[1] is not None:
                tensors[keys[1]] = router[1].to(to_torch(self.checkpoint.tensors[keys[1]].dtype))
        return tensors

    def _router_rows(self, calib: LayerCalib) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys = self.layer.router_keys
        weight = self.checkpoint.read(keys[0]).float()
        bias = self.checkpoint.read(keys[1]).float() if len(keys) > 1 else None
        return fit_router(weight, bias, self.plan_layer, calib)

    def _tensors(self, merged: dict[int, Experts]) -> dict[str, torch.Tensor]:
        tensors = self.checkpoint.tensors
        if self.fmt.fused:
            out = fused_tensors(self.fmt, stack([merged[i] for i in range(len(merged))]))
            return {k: v.to(to_torch(tensors[k].dtype)) for k, v in out.items()}
        assert self.fmt.per_expert is not None
        result = {}
        for i, expert in merged.items():
            centre = self.plan_layer.clusters[i][0]
            for role in ("gate", "up", "down"):
                key = self.fmt.per_expert[role][centre]
                name = renamed_expert_key(self.layout, key, centre, i)
                if name in self.names:
                    result[name] = getattr(expert, role)[0].to(to_torch(tensors[key].dtype))
        return result


def plan_tensors(checkpoint: Checkpoint, layout: ModelLayout, plan: MergePlan,
                 calib: CalibFn | None = None, errors: dict[int, float] | None = None,
                 refits: RefitFn | None = None) -> tuple[list[OutTensor], dict[str, str]]:
    """Output tensors (source byte order) and, for every input key, what happened to it:
    `copied`, `renamed`, `sliced`, `merged` or `folded`. Raises if any key is unaccounted.
    `refits(layer)`: refitted down projections by centre id (`--method fit-layer`)."""
    actions: dict[str, str] = {}
    outputs: dict[str, OutTensor] = {}
    for layer in layout.moe_layers:
        p = plan.layer(layer.index)
        if len(p.clusters) == layer.num_experts:
            continue
        merger = LayerMerger(checkpoint, layout, layer, plan, calib,
                             errors if errors is not None else {},
                             refits(layer.index) if refits is not None else None)
        for key, action, out in _layer_tensors(checkpoint, layout, layer, p, plan.router,
                                               merger):
            if key in actions:
                raise CheckpointError(f"tensor '{key}' is handled twice by the surgery")
            actions[key] = action
            if out is not None:
                outputs[key] = out
    if actions:  # experts changed: the MTP block's experts would no longer fit the config
        actions.update((key, "dropped") for key in layout.mtp_keys(list(checkpoint.tensors)))
    for key, info in checkpoint.tensors.items():
        if key not in actions:
            actions[key] = "copied"
            outputs[key] = OutTensor.copy(info)
    check_accounted(checkpoint, actions, outputs)
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
                name = renamed_expert_key(layout, key, old, i)
                refitted = old in merger.refits and key == fmt.per_expert["down"][old]
                if len(p.clusters[i]) == 1 and not refitted:
                    result.append((key, "renamed", OutTensor.copy(tensors[key], name)))
                else:
                    result.append((key, "merged", OutTensor.computed(
                        name, tensors[key].dtype, tensors[key].shape, merger.want(name))))
    for key in layer.router_keys:
        if router == "fit":
            shape = (new_count, *tensors[key].shape[1:])
            result.append((key, "merged", OutTensor.computed(key, tensors[key].dtype, shape,
                                                             merger.want(key))))
        else:
            result.append((key, *_router_tensor(checkpoint, tensors[key], p, router, 0)))
    if layer.selection_bias:  # --router fit: the centre's selection bias
        info = tensors[layer.selection_bias]
        result.append((layer.selection_bias, *_router_tensor(
            checkpoint, info, p, "centre" if router == "fit" else router, len(info.shape) - 1)))
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
                     source_name: str | None = None, stats_folder: Path | None = None,
                     evaluate: Callable[[Path], dict[str, Any] | None] | None = None
                     ) -> MergeResult:
    """Write the merged checkpoint of `source` into `out` (staged: whole or nothing), with its
    `moekit_provenance.json` and model card.
    `calib(layer)` gives the layer's calibration tokens (needed by `--method fit`); with
    `--method fit-layer`, `calib.refits(plan)` runs the sequential refit (`refit.py`) first.
    The records name the model as `source_name` (the user's folder or repo id; default
    `source`) and its `stats_folder`; `evaluate(staging_folder)`, run after the weights are
    written and before the rename, adds its numbers (result.extra["evaluation"])."""
    checkpoint = Checkpoint(source)
    layout = describe(checkpoint)
    if not layout.is_moe:
        raise CheckpointError(f"{source} is a dense model ({layout.family.name}): nothing to "
                              "merge")
    plan = validate_merge_plan(plan, layout, model_fingerprint(checkpoint, layout),
                               ignore_fingerprint)
    errors: dict[int, float] = {}
    refits = layer_refits(plan, calib)
    tensors, actions = plan_tensors(checkpoint, layout, plan, calib, errors, refits)
    config, config_keys, warnings = patch_config(checkpoint.config, layout, plan.as_prune_plan())
    counts = {a: sum(1 for v in actions.values() if v == a) for a in sorted(set(actions.values()))}
    result = MergeResult(Path(out), plan, sum(t.nbytes for t in tensors), len(tensors), counts,
                         config_keys, [*plan.warnings, *warnings], errors)

    def records(folder: Path) -> None:
        evaluation = evaluate(folder) if evaluate is not None else None
        result.extra["evaluation"] = evaluation
        write_merge_records(folder, source_name or str(source), plan, config_keys=config_keys,
                            warnings=result.warnings,
                            stats_folder=str(stats_folder) if stats_folder else None,
                            reconstruction=result.reconstruction, source_folder=Path(source),
                            evaluation=evaluation)

    write_model_folder(checkpoint, Path(out), tensors, config, overwrite=overwrite,
                       max_shard_bytes=max_shard_bytes, on_bytes=on_bytes, finish=records)
    return result


def layer_refits(plan: MergePlan, calib: Any) -> RefitFn | None:
    """`--method fit-layer`: run `calib.refits(plan)` (a `run.Calibration`) and record its
    per-layer alphas and held-out errors in the plan's calibration record."""
    if plan.method not in LAYER_FITS:
        return None
    if calib is None or not hasattr(calib, "refits"):
        raise InvalidArgumentError(f"--method {plan.method} needs calibration tokens",
                                   "pass --data NAME=PATH")
    refits = calib.refits(plan)
    plan.calibration = {**(plan.calibration or calib.describe()), "refit": refits.describe()}
    return refits
