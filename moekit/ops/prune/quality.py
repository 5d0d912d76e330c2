"""Data-driven pruning: candidate plans, measured selection as a plan, calibration statistics.

`measured_plan` turns the per-layer results of measured selection (`lanes.LaneRun`) into a
validated PrunePlan plus the refitted tensors. `stats_candidates` gives one plan per stats
criterion (statistics recorded on the same calibration tokens, `calibration_stats`). Candidates
are scored on the held-out calibration slice by KL(original || candidate) of the next-token
distributions, in the same layered run (`lanes`), and the lowest is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.calib.hooks import RoutingHooks
from moekit.calib.recorder import Recorder
from moekit.layerfit.measured import Calibration, MeasuredLayer
from moekit.layerfit.reference import ReferenceResiduals
from moekit.ops.prune.select import build_plan
from moekit.stats.expert_stats import VALUES, ExpertStats

if TYPE_CHECKING:
    import torch

    from moekit.layerfit.router_fit import RouterFit
    from moekit.stats.expert_stats import ExpertStats
    from moekit.surgery.plan import PrunePlan

AUTO_CRITERIA = ("frequency", "weight", "ean", "man", "reap", "reap-sum")


@dataclass
class Candidate:
    """A plan and its refits ({layer: {expert: W [H, I]}}), with its held-out score."""

    name: str
    plan: PrunePlan
    weights: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    rel_change: dict[int, dict[int, float]] = field(default_factory=dict)
    kl: float = math.nan
    top1: float = math.nan
    seconds: float = 0.0
    layers: list[MeasuredLayer] = field(default_factory=list)
    neurons: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    width: int | None = None
    routers: dict[int, RouterFit] = field(default_factory=dict)
    gate_up: dict[int, dict[int, Any]] = field(default_factory=dict)  # {layer: {e: GateUp}}


def measured_plan(cal: Calibration, fingerprint: str, layers: list[MeasuredLayer], *,
                  compensate: bool, protect: dict[int, list[int]], min_experts: int | None,
                  width: int | None = None) -> Candidate:
    """Measured selection's per-layer results (`layers`, in layer order) as a validated plan;
    with `width` every kept expert is trimmed to that many neurons too (`--keep-params`).
    `weights` hold the refits as they came ({layer: {expert: W}}, read lazily from disk)."""
    keep = {r.layer: r.kept for r in layers}
    plan = build_plan(cal.layout, fingerprint, keep=keep, protect=protect,
                      min_experts=min_experts)
    plan.criterion = "measured+compensate" if compensate else "measured"
    if width is not None:
        plan.criterion = f"measured+trim{width}"
    for p, r in zip(plan.layers, layers, strict=True):
        p.scores = [round(v, 8) for v in r.single]
    weights = {r.layer: r.fit.weights for r in layers if r.fit and r.fit.weights}
    changes = {r.layer: r.fit.rel_change for r in layers if r.fit and r.fit.weights}
    neurons = {r.layer: r.fit.neurons for r in layers if r.fit and r.fit.neurons}
    routers = {r.layer: r.router for r in layers if r.router is not None and r.router.changed}
    gate_up = {r.layer: r.gate_up for r in layers if r.gate_up}
    return Candidate(plan.criterion, plan, weights, changes,
                     seconds=sum(r.seconds for r in layers), layers=layers, neurons=neurons,
                     width=width, routers=routers, gate_up=gate_up)


def stats_candidates(cal: Calibration, stats: ExpertStats, fingerprint: str, ratio: float,
                     protect: dict[int, list[int]], min_experts: int | None) -> list[Candidate]:
    """One plan per stats criterion (AUTO_CRITERIA)."""
    out = []
    for criterion in AUTO_CRITERIA:
        plan = build_plan(cal.layout, fingerprint, criterion=criterion, ratio=ratio, stats=stats,
                          protect=protect, min_experts=min_experts)
        out.append(Candidate(criterion, plan))
    return out


def calibration_stats(cal: Calibration, fingerprint: str,
                      residuals: ReferenceResiduals | None = None) -> ExpertStats:
    """Routing statistics (tokens, weight/EAN/REAP sums, max_norm) of the unmodified model on
    the calibration windows, recorded by `calib.hooks.RoutingHooks` in one run of the engine
    (in memory or streamed), as ExpertStats. With `residuals`, the same run also records the
    MoE layers' outputs on its first windows (`layerfit.reference`)."""
    import hashlib
    from contextlib import nullcontext

    recorder = Recorder(num_domains=1)

    def before(index: int) -> None:
        recorder.set_batch(0, tuple(cal.fit[index].shape))
        if residuals is not None:
            residuals.before(index)

    with RoutingHooks(cal.model, cal.family, recorder, device=cal.engine.device), \
            residuals if residuals is not None else nullcontext():
        for _ in cal.engine.run(cal.fit, before=before):
            pass
    seen = sum(int(batch.numel()) for batch in cal.fit)
    values = {raw.layer: {c: tuple(float(x) for x in getattr(raw, c)[0]) for c in VALUES}
              for raw in recorder.finish()}
    digest = hashlib.sha256(repr(sorted(values.items())).encode()).hexdigest()
    meta = {"model_fingerprint": fingerprint, "family": cal.family.name, "tokens": seen}
    return ExpertStats(Path("calibration"), meta, digest, "all", ("all",), values)
