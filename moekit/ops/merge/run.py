"""`moekit merge` as a library call: check inputs, calibrate when needed, plan, write."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import moekit.ops.merge.refit
from moekit.errors import InvalidArgumentError, StatsError
from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.ops.merge.calib import (
    BATCH_SIZE,
    CapturedLayers,
    LayerCalib,
    capture_calibration,
    check_calibrated,
    domain_tokens,
    layer_record,
    sample_batches,
)
from moekit.ops.merge.estimate import estimate_refit
from moekit.ops.merge.grouping import (
    Grouper,
    check_ratio,
    cosine_distance,
    euclidean_distance,
    gram_cosine_distance,
)
from moekit.ops.merge.onepass import OnePass, SharedRun, capture_sample, check_layers, prefixes
from moekit.ops.merge.plan import (
    FIT_METHODS,
    LAYER_FITS,
    MergeLayer,
    MergePlan,
    check_choices,
    validate_merge_plan,
)
from moekit.ops.merge.refit import REFIT_DEFAULTS, open_refit, refit_merged
from moekit.stats.criteria import super_experts
from moekit.stats.expert_stats import check_stats, load_stats
from moekit.surgery.experts import (
    activation,
    expert_format,
    expert_output,
    read_experts,
    writable_format,
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
    one_pass: bool = True  # group inside the fit-layer refit's run (`onepass.py`)
    shared: OnePass | None = None  # what that run gave: clusters, refits, sample
    effort: str = "default"  # `effort.EFFORTS`: recorded in `describe()` unless "default"
    stats_tokens: int | None = None  # the statistics pass's positions (None: max_tokens)
    refit_tokens: int | None = None  # the down refit's streamed positions (None: max_tokens)
    estimate: bool = False  # log the measured run's predicted time first (`estimate.py`)

    def __call__(self, layer: int) -> LayerCalib | None:
        if self.layers is None:
            self.layers = capture_calibration(self.source, self.layout, self.sources,
                                              log=self.log, **self.options)
        return self.layers.get(layer)

    def refits(self, plan: MergePlan) -> LayerRefits:
        """The whole-layer sequential refit of `plan` (`--method fit-layer`, `refit.py`) on
        the same data, token budget and runtime settings: the one the shared run made when it
        made these clusters, else a run of its own."""
        if self.shared is not None and self.shared.clusters == [p.clusters for p in plan.layers]:
            return self.shared.refits
        return refit_merged(self.source, self.layout, plan, self.sources, log=self.log,
                            **self.refit_options())

    def refit_options(self) -> dict[str, Any]:
        found = {k: v for k, v in self.options.items() if k in REFIT_DEFAULTS}
        if self.refit_tokens is not None:
            found["refit_tokens"] = self.refit_tokens
        return found

    def shares_run(self, grouper: Grouper) -> bool:
        """Group inside the refit's run? Data-driven grouping with `--method fit-layer`, some
        expert folded, no captures made yet, and one engine setting for both (no `stream` or
        `hidden_ram` of the grouping's own)."""
        return (self.one_pass and self.layers is None and grouper.group in DATA_GROUPS
                and grouper.method in LAYER_FITS
                and any(grouper.n_drop(m.num_experts) for m in self.layout.moe_layers)
                and not {"stream", "hidden_ram"} & set(self.options))

    def group_and_refit(self, checkpoint: Checkpoint, grouper: Grouper) -> MergePlan:
        """The plan's clusters and the refit from one tokenisation and one layered run
        (`onepass.py`); `refits(plan)` then hands out that run's refit."""
        self.shared = group_and_refit(self, checkpoint, grouper)
        return grouper.plan(self.shared.layers)

    def describe(self) -> dict[str, Any]:
        ran = self.layers or self.shared
        tokens = ran.tokens if ran else None
        runtime = ran.runtime if ran else None
        effort = {} if self.effort == "default" else {
            "effort": self.effort, "stats_tokens": self.stats_tokens,
            "refit_tokens": self.refit_tokens}  # absent: the default, as before the levels
        return {"data": {s.name: str(s.path) for s in self.sources}, "tokens": tokens,
                **{k: v for k, v in self.options.items() if k != "device"}, **effort,
                "runtime": runtime}


DATA_GROUPS = ("hc-smoe", "m-smoe")  # groupings that need calibration activations


def needs_calibration(group: str, method: str, router: str = "centre") -> bool:
    return (group in DATA_GROUPS or method in (*FIT_METHODS, *LAYER_FITS)
            or router == "fit")


def distance_fn(group: str, checkpoint: Checkpoint, layout: ModelLayout,
                calib: Calibration | None) -> Any:
    """`distance(layer) -> [E, E]` for the grouping (see `grouping.py`)."""
    layers = {m.index: m for m in layout.moe_layers}

    def distance(index: int) -> torch.Tensor:
        fmt = expert_format(layout, layers[index], checkpoint)
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
                      protect_super: bool = True,
                      bf16_experts: bool = False) -> tuple[MergePlan, Any]:
    """Validate everything cheap first (choices, ratio, statistics), then group; super
    experts (`stats.criteria.super_experts`) stay unmerged unless `protect_super` is off;
    `bf16_experts`: quantized experts will be written as bf16, so any stored format is fine."""
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
                         "pass --stats DIR from `moekit profile`, or --data NAME=PATH to "
                         "record them on that text")
    for layer in layout.moe_layers:  # unsupported layouts fail before work
        (expert_format if bf16_experts else writable_format)(layout, layer, checkpoint)

    protect = super_experts(stats_data) if protect_super and stats_data is not None else {}
    grouper = Grouper(layout, fingerprint, group=group, method=method, router=router,
                      ratio=float(ratio), stats=stats_data, criterion=criterion, protect=protect)
    if calib is not None and calib.shares_run(grouper):
        plan = calib.group_and_refit(checkpoint, grouper)
    else:
        distance = distance_fn(group, checkpoint, layout, calib)
        plan = grouper.plan([grouper.layer(layer, distance) for layer in layout.moe_layers])
    if calib is not None and (calib.layers is not None or calib.shared is not None):
        plan.calibration = calib.describe()
    plan.protected = {layer: sorted(ids) for layer, ids in protect.items() if ids}
    return validate_merge_plan(plan, layout, fingerprint, ignore_fingerprint), stats_data


def group_and_refit(calib: Calibration, checkpoint: Checkpoint, grouper: Grouper) -> OnePass:
    """Cluster every MoE layer of `calib.layout` with `grouper` and refit it (module doc)."""
    from functools import partial

    layout, source = calib.layout, calib.source
    check_calibrated(layout)
    settings = {**REFIT_DEFAULTS, **calib.refit_options()}
    n_drop = grouper.n_drop(layout.moe_layers[0].num_experts)
    cal = open_refit(source, layout, calib.sources, log=calib.log, **settings)
    per_domain = domain_tokens(settings["max_tokens"], len(calib.sources))
    work = sample_batches(prefixes(cal.domains, per_domain, settings["seq_len"]),
                          calib.options.get("batch_size", BATCH_SIZE), per_domain)
    if calib.estimate and calib.log is not None:
        calib.log(estimate_refit(cal, source, n_drop, sum(take for _, take in work)).line())
    moe = {m.index: m for m in layout.moe_layers}
    blocks = {b.layer: b for b in cal.blocks}
    layers: list[MergeLayer] = []
    centres: dict[int, list[int]] = {}

    def before_layer(step: Any, batches: list[int], select: Callable[[int], None]) -> None:
        if step.index not in moe:
            return
        takes = zip(batches, [take for _, take in work], strict=True)
        cap = capture_sample(step, blocks[step.index], takes, select,
                             layout.family.router.logits_index)
        data = LayerCalib(step.index, **layer_record(source, layout, cap))
        del cap
        layers.append(grouper.layer(moe[step.index],
                                    distance_fn(grouper.group, checkpoint, layout,
                                                lambda _: data)))
        check_layers(layout, layers, n_drop)
        centres[step.index] = layers[-1].centres

    refits = moekit.ops.merge.refit.sequential_refit(
        cal, n_drop, centres, log=calib.log, make_run=partial(
            SharedRun, extra=[batch for batch, _ in work], before_layer=before_layer))
    if [p.layer for p in layers] != list(moe):
        raise RuntimeError(f"the shared run grouped layers {[p.layer for p in layers]}, the "
                           f"model's MoE layers are {list(moe)} (internal error)")
    return OnePass(layers, refits, sum(take for _, take in work), cal.engine.describe())
