"""Data-driven pruning: measured selection (+ compensation) and `--criterion auto`.

`measured_plan` turns `measured.measure_layers` into a validated PrunePlan plus the refitted
tensors. `auto_plan` builds candidates - every stats criterion (statistics recorded on the same
calibration tokens) and the measured selection with and without compensation - scores each on
the held-out calibration slice by KL(original || candidate) of the next-token distributions
(the candidate applied in memory, `override.PrunedLayers`), and keeps the lowest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.ops.prune.compensate import LayerFit
from moekit.ops.prune.measured import (
    Calibration,
    MeasuredLayer,
    apply_fit,
    grouping,
    measure_layers,
    restore_weights,
)
from moekit.ops.prune.override import PrunedLayers
from moekit.ops.prune.select import build_plan

if TYPE_CHECKING:
    import torch

    from moekit.ops.plan import PrunePlan
    from moekit.ops.prune.stats import ExpertStats

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


def measured_plan(cal: Calibration, fingerprint: str, ratio: float, *, beam: int,
                  compensate: bool, protect: dict[int, list[int]], min_experts: int | None,
                  width: int | None = None, on_layer: Any = None) -> Candidate:
    """Measured selection (module docstring of `measured`) as a validated plan; with `width`
    every kept expert is trimmed to that many neurons too (`--keep-params`)."""
    from moekit.ops.plan import drop_count

    start = time.perf_counter()
    n_drop = drop_count(ratio, cal.blocks[0].experts.num_experts)
    layers = measure_layers(cal, n_drop, beam=beam, compensate=compensate, protect=protect,
                            width=width, on_layer=on_layer)
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
    return Candidate(plan.criterion, plan, weights, changes,
                     seconds=time.perf_counter() - start, layers=layers, neurons=neurons,
                     width=width)


def reference_logprobs(cal: Calibration) -> list[torch.Tensor]:
    """log p(next token) of the unmodified model on the held-out batches (float32, CPU)."""
    import torch

    with torch.no_grad():
        return [_logprobs(cal.model, batch) for batch in cal.held]


def _logprobs(model: Any, batch: torch.Tensor) -> torch.Tensor:
    import torch

    logits = model(batch.to(next(model.parameters()).device), use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()


def score(cal: Calibration, candidate: Candidate, reference: list[torch.Tensor]) -> Candidate:
    """KL(original || candidate) and top-1 agreement, mean over held-out next-token positions,
    with the candidate's pruning and refits applied in memory (weights restored after)."""
    import torch

    n_drop = candidate.plan.num_dropped
    changes = grouping(cal.layout, candidate.plan.num_experts, n_drop)[1]
    kl = agree = count = 0.0
    with PrunedLayers() as pruned, torch.no_grad():
        try:
            for p in candidate.plan.layers:
                block = cal.block(p.layer)
                pruned.add(block, p.kept, cal.routing.after_prune(changes),
                           cal.family.router.logits_index)
                apply_fit(cal, block, LayerFit(p.layer, candidate.weights.get(p.layer, {})))
            for batch, ref in zip(cal.held, reference, strict=True):
                logp = _logprobs(cal.model, batch)
                kl += float((ref.exp() * (ref - logp)).sum())
                agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
                count += ref.shape[0] * ref.shape[1]
        finally:
            restore_weights(cal)
    candidate.kl, candidate.top1 = kl / max(count, 1), agree / max(count, 1)
    return candidate


def stats_candidates(cal: Calibration, stats: ExpertStats, fingerprint: str, ratio: float,
                     protect: dict[int, list[int]], min_experts: int | None) -> list[Candidate]:
    """One plan per stats criterion (AUTO_CRITERIA)."""
    out = []
    for criterion in AUTO_CRITERIA:
        plan = build_plan(cal.layout, fingerprint, criterion=criterion, ratio=ratio, stats=stats,
                          protect=protect, min_experts=min_experts)
        out.append(Candidate(criterion, plan))
    return out


def calibration_stats(cal: Calibration, fingerprint: str) -> ExpertStats:
    """Routing statistics (tokens, weight/EAN/REAP sums, max_norm) of the unmodified model on
    the calibration batches, recorded by `calib.hooks.RoutingHooks`, as ExpertStats."""
    import hashlib

    import torch

    from moekit.calib.hooks import RoutingHooks
    from moekit.calib.recorder import Recorder
    from moekit.ops.prune.stats import VALUES, ExpertStats

    recorder = Recorder(num_domains=1)
    seen = 0
    with RoutingHooks(cal.model, cal.family, recorder), torch.no_grad():
        for batch in cal.fit:
            if seen >= cal.max_tokens:
                break
            recorder.set_batch(0, tuple(batch.shape))
            cal.model(batch.to(next(cal.model.parameters()).device), use_cache=False)
            seen += batch.numel()
    values = {raw.layer: {c: tuple(float(x) for x in getattr(raw, c)[0]) for c in VALUES}
              for raw in recorder.finish()}
    digest = hashlib.sha256(repr(sorted(values.items())).encode()).hexdigest()
    meta = {"model_fingerprint": fingerprint, "family": cal.family.name, "tokens": seen}
    return ExpertStats(Path("calibration"), meta, digest, "all", ("all",), values)
