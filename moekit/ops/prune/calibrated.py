"""`prune --data ...`: choose (and compensate) with calibration data, then write the checkpoint.

criterion `measured` (the default with data): measured selection with compensation, and the
same selection without compensation; both scored by held-out KL, the better one kept.
criterion `auto`: additionally every stats criterion on statistics of the same tokens.
Any other criterion: statistics recorded on the calibration tokens, then that criterion.
Super experts (outstanding max_norm, `select.super_experts`) are protected unless turned off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.calib.data import DataSource
from moekit.errors import InvalidArgumentError
from moekit.ops.prune.quality import (
    Candidate,
    calibration_stats,
    measured_plan,
    reference_logprobs,
    score,
    stats_candidates,
)
from moekit.ops.prune.select import CRITERIA, build_plan, merge_protect, super_experts

DATA_CRITERIA = ("measured", "auto")


@dataclass
class DataOptions:
    """Calibration settings. `max_tokens`: token positions per layer for selection/refit;
    `held_out`: share of each source's windows kept apart for scoring candidates."""

    sources: list[DataSource]
    fraction: tuple[float, float] = (0.0, 1.0)
    seq_len: int = 256
    max_tokens: int = 4096
    beam: int = 4
    compensate: bool | None = None
    held_out: float = 0.2
    protect_super: bool = True
    width: int | None = None
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class DataChoice:
    """The chosen candidate, every candidate scored (table rows), calibration facts."""

    chosen: Candidate
    candidates: list[Candidate]
    info: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        return [{"candidate": c.name, "kl_held_out": round(c.kl, 6), "top1_held_out":
                 round(c.top1, 4), "seconds": round(c.seconds, 1),
                 "refitted_experts": sum(len(w) for w in c.weights.values()),
                 "chosen": c is self.chosen} for c in self.candidates]


def choose_with_data(source: Path, layout: Any, fingerprint: str, *, criterion: str,
                     ratio: float, protect: dict[int, list[int]], min_experts: int | None,
                     options: DataOptions, log: Callable[[str], None] = print) -> DataChoice:
    """Load the model once, pick the plan (module docstring)."""
    from moekit.ops.prune.measured import load_calibration

    if criterion not in (*DATA_CRITERIA, *CRITERIA):
        raise InvalidArgumentError(f"unknown --criterion '{criterion}'",
                                   f"use one of {', '.join((*DATA_CRITERIA, *CRITERIA))}")
    if options.beam < 1:
        raise InvalidArgumentError(f"--beam must be at least 1, got {options.beam}")
    build_plan(layout, fingerprint, criterion="random", ratio=ratio, protect=protect,
               min_experts=min_experts)  # validates ratio/top-k/protection before heavy work
    start = time.perf_counter()
    cal = load_calibration(source, layout, options.sources, fraction=options.fraction,
                           seq_len=options.seq_len, max_tokens=options.max_tokens,
                           held_out=options.held_out, device=options.device,
                           dtype=options.dtype)
    stats = calibration_stats(cal, fingerprint)
    found = super_experts(stats) if options.protect_super else {}
    guard = merge_protect(protect, found)
    log(f"calibration: {len(cal.fit)} windows, held out {len(cal.held)}; super experts "
        f"protected: {found or 'none'} ({time.perf_counter() - start:.0f} s)")
    candidates = _candidates(cal, stats, fingerprint, criterion, ratio, guard, min_experts,
                             options, log)
    reference = reference_logprobs(cal)
    for candidate in candidates:
        score(cal, candidate, reference)
        log(f"  {candidate.name}: held-out KL {candidate.kl:.5f}, top-1 {candidate.top1:.2%}")
    chosen = min(candidates, key=lambda c: c.kl)
    for c in candidates:
        c.plan.stats_sha256, c.plan.domain = stats.sha256, None
    info = {"sources": {s.name: str(s.path) for s in options.sources},
            "data_hash": cal.data_hash, "fraction": list(options.fraction),
            "seq_len": options.seq_len, "max_tokens": options.max_tokens, "beam": options.beam,
            "held_out_windows": len(cal.held), "super_experts": {str(k): v for k, v in
                                                                 found.items()},
            "seconds": round(time.perf_counter() - start, 1)}
    return DataChoice(chosen, candidates, info)


def _candidates(cal: Any, stats: Any, fingerprint: str, criterion: str, ratio: float,
                guard: dict[int, list[int]], min_experts: int | None, options: DataOptions,
                log: Callable[[str], None]) -> list[Candidate]:
    if criterion in CRITERIA:
        plan = build_plan(cal.layout, fingerprint, criterion=criterion, ratio=ratio, stats=stats,
                          protect=guard, min_experts=min_experts)
        return [Candidate(criterion, plan)]
    out = stats_candidates(cal, stats, fingerprint, ratio, guard, min_experts) \
        if criterion == "auto" else []

    def on_layer(r: Any) -> None:
        fit = f", refit held-out {r.fit.held_before:.4g} -> {r.fit.held_after:.4g}" \
            if r.fit and r.fit.weights else ""
        log(f"  layer {r.layer}: drop {r.dropped} (D = {r.error:.4g}{fit}; {r.seconds:.0f} s)")

    with_fit = options.compensate is not False
    measured = measured_plan(cal, fingerprint, ratio, beam=options.beam, compensate=with_fit,
                             protect=guard, min_experts=min_experts, width=options.width,
                             on_layer=on_layer)
    out.append(measured)
    if with_fit and options.compensate is None and options.width is None:
        plain = Candidate("measured", measured.plan, seconds=measured.seconds,
                          layers=measured.layers)
        plain.plan = _copy_plan(measured.plan, "measured")
        out.append(plain)
    return out


def _copy_plan(plan: Any, criterion: str) -> Any:
    from moekit.ops.plan import PrunePlan

    copy = PrunePlan.from_dict(plan.to_dict())
    copy.criterion = criterion
    return copy
