"""`moekit merge` as a library call: check inputs, calibrate when needed, plan, write."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import InvalidArgumentError, StatsError
from moekit.families.layout import describe
from moekit.io.fingerprint import model_fingerprint
from moekit.io.reader import Checkpoint
from moekit.ops.merge.calib import CapturedLayers, LayerCalib, capture_calibration
from moekit.ops.merge.experts import activation, expert_format, expert_output, read_experts
from moekit.ops.merge.grouping import (
    build_merge_plan,
    check_ratio,
    cosine_distance,
    euclidean_distance,
    gram_cosine_distance,
)
from moekit.ops.merge.plan import (
    FIT_METHODS,
    LAYER_FITS,
    MergePlan,
    check_choices,
    validate_merge_plan,
)

if TYPE_CHECKING:
    import torch

    from moekit.calib.data import DataSource
    from moekit.families.layout import ModelLayout
    from moekit.ops.merge.refit import LayerRefits


@dataclass
class Calibration:
    """Calibration tokens, captured on first use (one run of the engine over every MoE layer,
    bounded sample, each layer's activations spilled to disk and read back one at a time)."""

    source: Path
    layout: ModelLayout
    sources: list[DataSource]
    options: dict[str, Any] = field(default_factory=dict)
    layers: CapturedLayers | None = None
    log: Any = None

    def __call__(self, layer: int) -> LayerCalib | None:
        if self.layers is None:
            self.layers = capture_calibration(self.source, self.layout, self.sources,
                                              log=self.log, **self.options)
        return self.layers.get(layer)

    def refits(self, plan: MergePlan) -> LayerRefits:
        """The whole-layer sequential refit of `plan` (`--method fit-layer`, `refit.py`) on
        the same data, token budget and runtime settings."""
        from moekit.ops.merge.refit import refit_merged

        keys = ("fraction", "seq_len", "max_tokens", "device", "dtype", "max_memory",
                "text_field", "tokenizer")
        return refit_merged(self.source, self.layout, plan, self.sources, log=self.log,
                            **{k: v for k, v in self.options.items() if k in keys})

    def describe(self) -> dict[str, Any]:
        tokens = self.layers.tokens if self.layers else None
        runtime = self.layers.runtime if self.layers else None
        return {"data": {s.name: str(s.path) for s in self.sources}, "tokens": tokens,
                **{k: v for k, v in self.options.items() if k != "device"}, "runtime": runtime}


def needs_calibration(group: str, method: str, router: str = "centre") -> bool:
    return (group in ("hc-smoe", "m-smoe") or method in (*FIT_METHODS, *LAYER_FITS)
            or router == "fit")


def distance_fn(group: str, checkpoint: Checkpoint, layout: ModelLayout,
                calib: Calibration | None) -> Any:
    """`distance(layer) -> [E, E]` for the grouping (see `grouping.py`)."""
    layers = {m.index: m for m in layout.moe_layers}

    def distance(index: int) -> torch.Tensor:
        fmt = expert_format(checkpoint, layout, layers[index])
        if group == "weight":
            return gram_cosine_distance(read_experts(checkpoint, fmt).gram())
        data = calib(index) if calib is not None else None
        if data is None:
            raise InvalidArgumentError(f"--group {group} needs calibration tokens for layer "
                                       f"{index}", "pass --data NAME=PATH")
        if group == "m-smoe":
            return cosine_distance(data.logits.T)
        return euclidean_distance(mean_outputs(checkpoint, layout, fmt, data))

    return distance


def mean_outputs(checkpoint: Checkpoint, layout: ModelLayout, fmt: Any,
                 data: LayerCalib) -> torch.Tensor:
    """[E, H]: c_j = mean over the calibration tokens of f_j(x) (every expert, every token)."""
    import torch

    experts = read_experts(checkpoint, fmt)
    act = activation(layout)
    return torch.stack([expert_output(experts, j, data.inputs, act).mean(dim=0)
                        for j in range(experts.num_experts)])


def choose_merge_plan(source: Path, *, stats: Path | None, ratio: float | None, group: str,
                      method: str, router: str, criterion: str, plan_in: Path | None,
                      domain: str = "all", ignore_fingerprint: bool = False,
                      calib: Calibration | None = None,
                      protect_super: bool = True) -> tuple[MergePlan, Any]:
    """Validate everything cheap first (choices, ratio, statistics), then group; super
    experts (`prune.select.super_experts`) stay unmerged unless `protect_super` is off."""
    from moekit.ops.prune.stats import check_stats, load_stats

    check_choices(group, method, router)
    checkpoint = Checkpoint(source)
    layout = describe(checkpoint)
    if not layout.is_moe:
        raise InvalidArgumentError(f"{source} is a dense model ({layout.family.name}): "
                                   "nothing to merge")
    fingerprint = model_fingerprint(checkpoint, layout)
    stats_data = load_stats(stats, domain) if stats is not None else None
    if stats_data is not None:
        check_stats(stats_data, layout, fingerprint, ignore_fingerprint)
    if plan_in is not None:
        if ratio is not None:
            raise InvalidArgumentError("--plan is given with --ratio",
                                       "a plan already fixes the clusters; drop --ratio")
        plan = validate_merge_plan(MergePlan.load(plan_in), layout, fingerprint,
                                   ignore_fingerprint)
        return plan, stats_data
    check_ratio(layout, ratio)
    if stats_data is None and criterion != "random":
        raise StatsError("merge needs routing statistics (usage weights, centres)",
                         "pass --stats DIR from `moekit profile`")
    for layer in layout.moe_layers:
        expert_format(checkpoint, layout, layer)  # unsupported layouts fail before any work
    from moekit.ops.prune.select import super_experts

    protect = super_experts(stats_data) if protect_super and stats_data is not None else {}
    plan = build_merge_plan(layout, fingerprint, distance_fn(group, checkpoint, layout, calib),
                            group=group, method=method, router=router, ratio=float(ratio),
                            stats=stats_data, criterion=criterion, protect=protect)
    if calib is not None and calib.layers is not None:
        plan.calibration = calib.describe()
    return validate_merge_plan(plan, layout, fingerprint, ignore_fingerprint), stats_data
