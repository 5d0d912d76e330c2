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
from moekit.formats import quantized_keys
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
    writable_format,
)
from moekit.surgery.stored import encoded, keep_unquantized, replaced_rows
from moekit.surgery.tensors import check_accounted, patch_config, renamed_expert_key, take_rows

if TYPE_CHECKING:
    import torch

    from moekit.ops.merge.calib import LayerCalib

BF16 = "BF16"
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
                 refits: Mapping[int, torch.Tensor] | None = None, bf16: bool = False):
        self.checkpoint, self.layout, self.layer, self.plan = checkpoint, layout, layer, plan
        self.fmt = expert_format(layout, layer, checkpoint) if bf16 else \
            writable_format(layout, layer, checkpoint)
        self.bf16 = bf16 and bool(self.fmt.logical)  # quantized experts written as bf16
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
        whole = self.fmt.fused or calib is not None or bool(self.refits) or self.bf16
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
        fitted = method in FIT_METHODS and calib is not None
        changed = {i for i, c in enumerate(p.clusters)
                   if len(c) > 1 or c[0] in self.refits or fitted}
        tensors = self._tensors(merged, changed)
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

    def _tensors(self, merged: dict[int, Experts], changed: set[int]
                 ) -> dict[str, torch.Tensor]:
        """{output name: tensor} of the merged experts, in the source's stored format:
        quantized ones re-encoded (`surgery/stored.py`), except the rows of unchanged
        experts (`changed` lacks them) of a quantized fused stack, kept as stored bytes."""
        tensors, fmt = self.checkpoint.tensors, self.fmt
        if fmt.fused:
            out = fused_tensors(fmt, stack([merged[i] for i in range(len(merged))]))
            centres = [c[0] for c in self.plan_layer.clusters]
            result = {}
            for name, value in out.items():
                logical = fmt.stored(name, tensors.get(name))
                if logical.quantized and self.bf16:
                    result[name] = value.to(to_torch(BF16))
                elif logical.quantized:
                    result.update(replaced_rows(logical, centres, {
                        i: value[i] for i in sorted(changed)}))
                else:
                    result.update(encoded(logical, name, value))
            return result
        assert fmt.per_expert is not None
        result = {}
        for i, expert in merged.items():
            centre = self.plan_layer.clusters[i][0]
            for role in ("gate", "up", "down"):
                key = fmt.per_expert[role][centre]
                name = renamed_expert_key(self.layout, key, centre, i)
                logical, value = fmt.stored(key, tensors.get(key)), getattr(expert, role)[0]
                stored = {name: value.to(to_torch(BF16))} if self.bf16 else \
                    encoded(logical, name, value)
                result.update((k, v) for k, v in stored.items() if k in self.names)
        return result


def plan_tensors(checkpoint: Checkpoint, layout: ModelLayout, plan: MergePlan,
                 calib: CalibFn | None = None, errors: dict[int, float] | None = None,
                 refits: RefitFn | None = None, bf16: bool = False
                 ) -> tuple[list[OutTensor], dict[str, str]]:
    """Output tensors (source byte order) and, for every input key, what happened to it:
    `copied`, `renamed`, `sliced`, `merged`, `folded` or `dequantized` (`bf16`: every expert
    of a changed layer stored quantized is written as bf16, its scales dropped). Raises if any
    key is unaccounted. `refits(layer)`: refitted down projections by centre id
    (`--method fit-layer`)."""
    actions: dict[str, str] = {}
    outputs: dict[str, OutTensor] = {}
    for layer in layout.moe_layers:
        p = plan.layer(layer.index)
        if len(p.clusters) == layer.num_experts:
            continue
        merger = LayerMerger(checkpoint, layout, layer, plan, calib,
                             errors if errors is not None else {},
                             refits(layer.index) if refits is not None else None, bf16)
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
    if merger.bf16:
        result += _bf16_experts(layout, layer, p, merger)
    elif fmt.fused:
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
                refitted = (old in merger.refits
                            and fmt.logical_name(key) == fmt.per_expert["down"][old])
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


def _bf16_experts(layout: ModelLayout, layer: MoeLayer, p: MergeLayer, merger: LayerMerger
                  ) -> list[tuple[str, str, OutTensor | None]]:
    """`merge --bf16-experts` on a layer of quantized experts: every expert of the layer (new
    id i = cluster i) written as its bf16 logical tensors; scales and the folded experts'
    tensors written nowhere."""
    fmt, result = merger.fmt, []
    new_of = {c[0]: i for i, c in enumerate(p.clusters)}
    keys = [(None, k) for k in layer.fused_keys] or \
        [(old, k) for old, ks in enumerate(layer.expert_keys) for k in ks]
    for old, key in keys:
        name = fmt.logical_name(key)
        logical = fmt.stored(name, merger.checkpoint.tensors.get(key))
        if old is not None and old not in new_of:
            result.append((key, "folded", None))
        elif key != logical.sources[0].name:  # scales, activation parameters
            result.append((key, "dequantized", None))
        else:
            shape = (len(p.clusters), *logical.shape[1:]) if old is None else logical.shape
            new = name if old is None else renamed_expert_key(layout, name, old, new_of[old])
            dtype = BF16 if logical.quantized else logical.sources[0].dtype
            result.append((key, "merged", OutTensor.computed(new, dtype, shape,
                                                             merger.want(new))))
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
                     evaluate: Callable[[Path], dict[str, Any] | None] | None = None,
                     bf16_experts: bool = False) -> MergeResult:
    """Write the merged checkpoint of `source` into `out` (staged: whole or nothing), with its
    `moekit_provenance.json` and model card.
    `calib(layer)` gives the layer's calibration tokens (needed by `--method fit`); with
    `--method fit-layer`, `calib.refits(plan)` runs the sequential refit (`refit.py`) first.
    The records name the model as `source_name` (the user's folder or repo id; default
    `source`) and its `stats_folder`; `evaluate(staging_folder)`, run after the weights are
    written and before the rename, adds its numbers (result.extra["evaluation"]).
    `bf16_experts`: quantized experts of the changed layers are written as bf16 (the config's
    quantization lists their modules as not converted) instead of re-encoded."""
    checkpoint = Checkpoint(source)
    layout = describe(checkpoint)
    if not layout.is_moe:
        raise CheckpointError(f"{source} is a dense model ({layout.family.name}): nothing to "
                              "merge")
    plan = validate_merge_plan(plan, layout, model_fingerprint(checkpoint, layout),
                               ignore_fingerprint)
    errors: dict[int, float] = {}
    refits = layer_refits(plan, calib)
    tensors, actions = plan_tensors(checkpoint, layout, plan, calib, errors, refits,
                                    bf16_experts)
    config, config_keys, warnings = patch_config(checkpoint.config, layout, plan.as_prune_plan())
    warnings += requantized_note(checkpoint, layout, actions)
    if bf16_experts:
        config_keys += _bf16_config(config, layout, plan, actions, warnings)
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


def requantized_note(checkpoint: Checkpoint, layout: ModelLayout, actions: dict[str, str]
                     ) -> list[str]:
    """The line provenance and model card carry when merged experts were re-encoded in the
    source's quantized format (`surgery/stored.py`)."""
    merged = [k for k, a in actions.items() if a == "merged"]
    formats = quantized_keys(checkpoint, merged)
    if not formats:
        return []
    return [f"the merged experts are quantized like the source: re-encoded as {formats} "
            "(new scales computed from the merged values); unmerged experts are copied as "
            "stored"]


def _bf16_config(config: dict[str, Any], layout: ModelLayout, plan: MergePlan,
                 actions: dict[str, str], warnings: list[str]) -> list[str]:
    """`--bf16-experts`: the expert modules of the layers written dequantized, named in the
    config's quantization (`surgery.stored.keep_unquantized`) and in a warning."""
    done = {k for k, a in actions.items() if a == "dequantized"}
    modules = [layer.prefix + layout.family.experts.prefixes[0].rstrip(".")
               for layer in layout.moe_layers
               if done & set(layer.routed_keys)]
    if not modules:
        return []
    warnings.append(f"the experts of {len(modules)} merged layer(s) are written dequantized to "
                    "bf16 (--bf16-experts); quantization_config names their modules as not "
                    f"converted: {', '.join(modules[:3])}{' ...' if len(modules) > 3 else ''}")
    return keep_unquantized(config, modules)


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
