"""`prune --data ...`: choose (and compensate) with calibration data, then write the checkpoint.

criterion `measured` (the default with data): measured selection with compensation (down
projections; with `router`, also the router rows, then the down refits alone are a candidate
too), and the same selection without compensation; all scored by held-out KL, the best kept.
criterion `auto`: additionally every stats criterion on statistics of the same tokens.
Any other criterion: statistics recorded on the calibration tokens, then that criterion.
Super experts (outstanding max_norm, `criteria.super_experts`) are protected unless turned off.

The model runs through `moekit.runtime` (in memory, or streamed one layer at a time under
`max_memory`) in two runs: the routing statistics (`quality.calibration_stats`), then one
layered run that selects, refits and scores every candidate (`lanes`). Refits go to a temporary
folder and are read back one tensor at a time by the writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moekit.calib.spec import DataSpec
from moekit.errors import DataError, InvalidArgumentError, UnsupportedModelError
from moekit.io.reader import Checkpoint
from moekit.layerfit.compute import forward_macs, reconstruct_step_cap
from moekit.layerfit.estimate import Estimate, RunShape, peak_memory, predict, probe
from moekit.layerfit.lanes import Lane, LaneRun, Search
from moekit.layerfit.measured import grouping, load_calibration, needs_refit
from moekit.layerfit.reconstruct import STEPS as RECONSTRUCT_STEPS
from moekit.layerfit.reference import ReferenceResiduals
from moekit.layerfit.tokens import (
    MIN_TOKENS,
    PRUNE_TOKENS,
    REFIT_FACTOR,
    calibration_tokens,
    reconstruct_bytes,
    refit_sum_bytes,
)
from moekit.ops.prune.effort import apply_effort, described
from moekit.ops.prune.quality import (
    AUTO_CRITERIA,
    Candidate,
    calibration_stats,
    measured_plan,
    stats_candidates,
)
from moekit.ops.prune.select import build_plan, merge_protect
from moekit.runtime.engine import mode_line
from moekit.runtime.groups import require_whole_layers
from moekit.runtime.options import RunOptions
from moekit.runtime.spill import TensorSpill
from moekit.stats.criteria import CRITERIA, super_experts
from moekit.surgery.experts import writable_format
from moekit.surgery.plan import PrunePlan, drop_count
from moekit.units import human

DATA_CRITERIA = ("measured", "auto")
DOWN_ONLY = "measured+compensate-router"  # the down refits without the router refits


@dataclass
class DataOptions:
    """Calibration settings. `data`: the calibration text (`calib.spec.DataSpec`: sources,
    range, text field, tokenizer, window; its `max_tokens` is the CLI's `--max-tokens N`, the
    tokens read in total, `measured.fit_tokens(N, held_out)` of them fitted; None:
    `measured.default_read`); `run`: how the model runs (`runtime.options.RunOptions`).
    `max_tokens`: token positions per layer for selection/refit (None:
    `tokens.calibration_tokens`, 32768 or fewer to fit the memory); `held_out`: share
    of each source's windows kept apart for scoring candidates; `spread`: the windows are
    spaced evenly over up to `spread` times the needed tokens of each source
    (`measured.spread_windows`; 1: its first windows); `refit_tokens`: positions per layer
    the down refit streams (None or <= max_tokens: the selection's own; more: read further
    into each source, `refit_stream`); `reconstruct_steps`: at most this many steps of the
    whole-expert reconstruction after the down refit (`reconstruct`; 0: off); `refit_auto`
    (the CLI's default): without `refit_tokens`, stream `tokens.REFIT_FACTOR` times the
    selection's positions for both when the memory allows (`_auto_refit`). `effort`
    (`effort.EFFORTS`) fills the fields set to None (`beam`, `reconstruct_steps`: the CLI
    passes None when the option is not given; the library defaults are `best`'s values;
    `compensate` when unset; `token_default`: the default count instead of 32768, still
    lowered to fit the memory) and the reconstruction's `reconstruct_forwards` (its steps
    capped at that many forward passes' multiply-adds over the positions, `_step_cap`; None:
    no cap) and `reconstruct_progress`
    (`effort.apply_effort`, a new record); the library default `best` is the settings before
    the levels. `selection` (a stats criterion, set by `--effort fast` for `measured`): the
    statistics choose the experts and one layered run over the first `refit_share` of the
    positions refits their down projections (`_refit_selection`), with no search and no
    scoring lanes."""

    data: DataSpec = DataSpec()
    max_tokens: int | None = None
    beam: int | None = 4
    compensate: bool | None = None
    router: bool = False
    held_out: float = 0.2
    spread: int = 1
    protect_super: bool = True
    width: int | None = None
    run: RunOptions = RunOptions()
    stream: bool | None = None
    hidden_ram: int | None = None
    refit_tokens: int | None = None
    reconstruct_steps: int | None = RECONSTRUCT_STEPS
    refit_auto: bool = False
    effort: str = "best"
    token_default: int | None = None
    reconstruct_forwards: float | None = None
    reconstruct_progress: float = 0.0
    selection: str | None = None
    refit_share: float = 1.0


@dataclass
class DataChoice:
    """The chosen candidate, every candidate scored (table rows), calibration facts."""

    chosen: Candidate
    candidates: list[Candidate]
    info: dict[str, Any] = field(default_factory=dict)
    stats: Any = None  # ExpertStats of the calibration tokens (traffic/weight removed)

    def table(self) -> list[dict[str, Any]]:
        return [{"candidate": c.name, "kl_held_out": round(c.kl, 6), "top1_held_out":
                 round(c.top1, 4), "seconds": round(c.seconds, 1),
                 "refitted_experts": sum(len(w) for w in c.weights.values()),
                 "refitted_routers": len(c.routers),
                 "chosen": c is self.chosen} for c in self.candidates]


def choose_with_data(source: Path, layout: Any, fingerprint: str, *, criterion: str,
                     ratio: float, protect: dict[int, list[int]], min_experts: int | None,
                     options: DataOptions, log: Callable[[str], None] = print) -> DataChoice:
    """Open the model once (memory or streamed), pick the plan (module docstring)."""
    start = time.perf_counter()
    cal, _, options = _prepare(source, layout, fingerprint, criterion, ratio, protect,
                               min_experts, options, log)
    require_whole_layers(cal.engine, "a calibrated prune")
    if options.selection is not None:
        return _choose_fast(cal, fingerprint, ratio, protect, min_experts, options, log, start)
    residuals = ReferenceResiduals(cal.blocks, len(cal.fit), TensorSpill(
        "moekit-reference-", cal.engine.spill_dir)) \
        if _records_reference(cal, criterion, drop_count(
            ratio, layout.moe_layers[0].num_experts), options) else None
    try:
        stats = calibration_stats(cal, fingerprint, residuals)
        found = super_experts(stats) if options.protect_super else {}
        guard = merge_protect(protect, found)
        _log_calibration(cal, found, start, log)
        stats_plans, search = _setup(cal, stats, fingerprint, criterion, ratio, guard,
                                     min_experts, options)
        lanes = _lanes(stats_plans, search, options, original=residuals is None)
        _check_held(cal, lanes)
        run = LaneRun(cal, lanes, search, TensorSpill("moekit-refits-", cal.engine.spill_dir),
                      lambda r: _log_layer(r, log),
                      reference=residuals.get if residuals is not None else None)
        scores = run.run()
    finally:
        if residuals is not None:
            residuals.close()
    candidates = stats_plans + (_measured(cal, fingerprint, run, search, options, min_experts)
                                if search is not None else [])
    for candidate in candidates:
        candidate.kl, candidate.top1 = scores.mean(candidate.name)
        log(f"  {candidate.name}: held-out KL {candidate.kl:.5f}, top-1 {candidate.top1:.2%}")
    chosen = min(candidates, key=lambda c: c.kl)
    for c in candidates:
        c.plan.stats_sha256, c.plan.domain = stats.sha256, None
    info = _info(cal, options, found, start)
    return DataChoice(chosen, candidates, info, stats)


def _records_reference(cal: Any, criterion: str, n_drop: int, options: DataOptions) -> bool:
    """Whether the statistics pass records the unmodified residuals the refit aims at
    (`layerfit.reference`), so the layered run needs no `original` lane: a measured search
    with a refit, unless the refit streams more windows than the statistics see or the
    router refit needs the original router logits too."""
    return criterion in DATA_CRITERIA and not options.router and not cal.streams_refit and \
        needs_refit(n_drop, options.compensate is not False, options.width)


def _log_calibration(cal: Any, found: dict[int, list[int]], start: float,
                     log: Callable[[str], None]) -> None:
    refit = f", {len(cal.extra)} more for the refit ({cal.refit_tokens} positions)" \
        if cal.streams_refit else ""
    log(f"calibration: {len(cal.fit)} windows{refit}, held out {len(cal.held)}; super experts "
        f"protected: {found or 'none'} ({time.perf_counter() - start:.0f} s)")


def _choose_fast(cal: Any, fingerprint: str, ratio: float, protect: dict[int, list[int]],
                 min_experts: int | None, options: DataOptions, log: Callable[[str], None],
                 start: float) -> DataChoice:
    """`--effort fast` (`options.selection`): one statistics pass that also records the
    unmodified residuals of the windows the refit uses (`layerfit.reference`; not when the
    refit streams more windows, whose original lane is needed anyway), then
    `_refit_selection`."""
    lead = len(_first_share(cal.fit, options.refit_share))
    residuals = None if cal.streams_refit else ReferenceResiduals(
        cal.blocks, lead, TensorSpill("moekit-reference-", cal.engine.spill_dir))
    try:
        stats = calibration_stats(cal, fingerprint, residuals)
        found = super_experts(stats) if options.protect_super else {}
        _log_calibration(cal, found, start, log)
        chosen = _refit_selection(cal, stats, fingerprint, ratio, merge_protect(protect, found),
                                  min_experts, options, log, residuals)
    finally:
        if residuals is not None:
            residuals.close()
    for c in chosen:
        c.plan.stats_sha256, c.plan.domain = stats.sha256, None
    return DataChoice(chosen[0], chosen, _info(cal, options, found, start), stats)


def estimate_run(source: Path, layout: Any, fingerprint: str, *, criterion: str,
                 ratio: float, protect: dict[int, list[int]], min_experts: int | None,
                 options: DataOptions, log: Callable[[str], None] = print) -> Estimate:
    """What `choose_with_data` does up to its estimate (model opened, data tokenised, the
    probe), without the work: the predicted time and peak memory (`estimate`)."""
    return _prepare(source, layout, fingerprint, criterion, ratio, protect, min_experts,
                    options, log)[1]


def _prepare(source: Path, layout: Any, fingerprint: str, criterion: str, ratio: float,
             protect: dict[int, list[int]], min_experts: int | None, options: DataOptions,
             log: Callable[[str], None]) -> tuple[Any, Estimate, DataOptions]:
    """Check the options, apply the effort level, open the model and tokenise the data, probe
    and log the estimate (the first line), the effort's settings and the runtime mode. Returns
    the calibration, the estimate and the options as resolved (effort level, token counts: a
    new record, `options` is left as given)."""
    if criterion not in (*DATA_CRITERIA, *CRITERIA):
        raise InvalidArgumentError(f"unknown --criterion '{criterion}'",
                                   f"use one of {', '.join((*DATA_CRITERIA, *CRITERIA))}")
    build_plan(layout, fingerprint, criterion="random", ratio=ratio, protect=protect,
               min_experts=min_experts)  # validates ratio/top-k/protection before heavy work
    n_drop = drop_count(ratio, layout.moe_layers[0].num_experts)
    settings, options = apply_effort(options, layout, n_drop)
    if criterion != "measured" or grouping(layout, layout.moe_layers[0].num_experts, n_drop)[1]:
        options = replace(options, selection=None)  # a stats plan's refit: measured, balanced
    if options.beam is None or options.beam < 1:
        raise InvalidArgumentError(f"--beam must be at least 1, got {options.beam}")
    options = _resolve_tokens(source, layout, ratio, options, log)
    cal = load_calibration(source, layout, options.data, max_tokens=options.max_tokens,
                           held_out=0.0 if options.selection else options.held_out,
                           run=options.run,
                           stream=options.stream, hidden_ram=options.hidden_ram,
                           spread=options.spread, refit_tokens=_refit_tokens(options))
    options = _step_cap(cal, options)
    found = _estimate(source, cal, criterion, n_drop, options)
    log(found.line())
    log(described(settings, options) if criterion in DATA_CRITERIA else
        f"effort {settings.name}: {options.max_tokens} positions for the '{criterion}' statistics")
    log(mode_line(cal.engine))
    return cal, found, options


def _estimate(source: Path, cal: Any, criterion: str, n_drop: int,
              options: DataOptions) -> Estimate:
    """Probe the model on a few positions and predict the run (`estimate`)."""
    measured = criterion in DATA_CRITERIA
    search = _search(cal.layout, n_drop, {}, options, source) if measured else None
    recorded = _records_reference(cal, criterion, n_drop, options)
    lanes = _lanes([], search, options, original=not recorded)
    stats_lanes = len(AUTO_CRITERIA) if criterion == "auto" else 0 if measured else 1
    refit = search is not None and needs_refit(n_drop, search.compensate, search.width)
    steps = search.reconstruct if search is not None and refit else 0
    fixed = options.selection is not None
    found = probe(cal, n_drop=n_drop, beam=options.beam or 1, refit=refit,
                  reconstruct=bool(steps), select=measured, fixed=fixed)
    positions = sum(int(w.numel()) for w in cal.fit)
    held = sum(lane.held for lane in lanes) + stats_lanes
    captured = (2 if refit and not recorded else 1) if measured else 0
    if fixed:  # `_refit_selection`'s pruned lane (and original lane, when the refit streams)
        lanes, held = (lanes[:1] if cal.streams_refit else []) + lanes[-2:-1], 0
        captured = len(lanes)
    shape = RunShape(_leading(cal.fit, options.refit_share) if fixed else positions,
                     sum(int(w.numel()) for w in cal.extra),
                     sum(int(w.numel()) for w in cal.held), sum(not lane.held for lane in lanes),
                     held, captured, steps, len(cal.layout.moe_layers),
                     _checkpoint_bytes(source), positions)
    itemsize = int(getattr(cal.model.dtype, "itemsize", 4))
    return Estimate(predict(found, shape), peak_memory(cal, shape, n_drop, itemsize), found)


def _step_cap(cal: Any, options: DataOptions) -> DataOptions:
    """`options` with `reconstruct_steps` capped at `reconstruct_forwards` forward passes'
    multiply-adds over the selection's positions (`layerfit.compute`; a new record)."""
    if not options.reconstruct_forwards or not options.reconstruct_steps:
        return options
    positions = sum(int(w.numel()) for w in cal.fit)
    k = int(cal.layout.top_k())
    per_position = forward_macs(cal.model, cal.blocks, k, cal.layout.config,
                                options.data.seq_len)
    cap = reconstruct_step_cap(options.reconstruct_forwards, positions, per_position,
                               cal.blocks, k, options.reconstruct_steps,
                               positions + sum(int(w.numel()) for w in cal.extra))
    return replace(options, reconstruct_steps=cap)


def _leading(windows: list[Any], share: float) -> int:
    """Positions in the leading windows that hold `share` of all their positions."""
    return sum(int(w.numel()) for w in _first_share(windows, share))


def _first_share(windows: list[Any], share: float) -> list[Any]:
    """The leading windows holding `share` of all their positions (interleaved: every source
    is there), at least one."""
    need = share * sum(int(w.numel()) for w in windows)
    out, seen = [], 0
    for window in windows:
        if out and seen >= need:
            break
        out.append(window)
        seen += int(window.numel())
    return out


def _refit_selection(cal: Any, stats: Any, fingerprint: str, ratio: float,
                     guard: dict[int, list[int]], min_experts: int | None, options: DataOptions,
                     log: Callable[[str], None],
                     residuals: ReferenceResiduals | None = None) -> list[Candidate]:
    """`--effort fast`: the plan of the stats criterion `options.selection` (with the guard's
    protection), then one layered run over the first `refit_share` of the positions with
    that plan fixed (`Search(kept=...)`, merge's refit path): the statistics pass's
    `residuals` (else an original lane) give each layer's reference residual, the pruned
    lane the inputs the refit sees; the kept experts' down projections are refitted to the
    unpruned layer's output plus the drift (`layerfit.compensate`, each layer's own held-out
    quarter decides). One candidate, so no held-out scoring lanes (its KL is not measured:
    NaN)."""
    layout = cal.layout
    plan = build_plan(layout, fingerprint, criterion=options.selection, ratio=ratio,
                      stats=stats, protect=guard, min_experts=min_experts)
    cal.fit, cal.held = _first_share(cal.fit, options.refit_share), []
    cal.max_tokens = sum(int(w.numel()) for w in cal.fit)
    search = Search(drop_count(ratio, layout.moe_layers[0].num_experts), beam=1,
                    compensate=True, protect=guard, router=False,
                    kept={p.layer: list(p.kept) for p in plan.layers})
    lanes = [] if residuals is not None else [Lane("original", held=False)]
    lanes.append(Lane("pruned", held=False, measured=True, refitted=True))
    run = LaneRun(cal, lanes, search, TensorSpill("moekit-refits-", cal.engine.spill_dir),
                  lambda r: _log_layer(r, log),
                  reference=residuals.get if residuals is not None else None)
    run.run()
    found = measured_plan(cal, fingerprint, run.results, compensate=True, protect=guard,
                          min_experts=min_experts)
    found.name = found.plan.criterion = f"{options.selection}+compensate"
    for mine, theirs in zip(found.plan.layers, plan.layers, strict=True):
        mine.scores = theirs.scores
    log(f"  {found.name}: chosen by '{options.selection}' on {stats.metadata['tokens']} positions, "
        f"down projections refitted on {cal.max_tokens}")
    return [found]


def _checkpoint_bytes(source: Path) -> int:
    return sum(p.stat().st_size for p in Path(source).glob("*.safetensors"))


def _check_held(cal: Any, lanes: list[Lane]) -> None:
    """Candidates are told apart on held-out windows: with none, every KL would read 0."""
    if not cal.held and sum(lane.held for lane in lanes) > 2:  # reference + 2+ candidates
        raise DataError("the calibration data is too short to hold out a window for scoring "
                        "the candidate plans (each source gave a single window)",
                        "pass more text, a larger --max-tokens or a shorter --seq-len, or fix "
                        "the plan with --criterion measured --compensate / --no-compensate")


def _resolve_tokens(source: Path, layout: Any, ratio: float, options: DataOptions,
                    log: Callable[[str], None]) -> DataOptions:
    """`options` with the token counts resolved (a new record; `options` is left as given):
    the default count when none was given (`tokens.calibration_tokens`), the memory that does
    not depend on it (one experts call's transient; with `--refit-tokens`, its sums) coming
    first; the automatic refit positions (`_auto_refit`); the reconstruction off when it does
    not fit. A `--refit-tokens` run whose sums would not fit beside the weights is refused
    before any work."""
    n_drop = drop_count(ratio, layout.moe_layers[0].num_experts)
    if options.refit_auto and options.refit_tokens is None and \
            _reconstruct_steps(layout, options, source):
        options = replace(options, refit_tokens=_auto_refit(source, layout, n_drop, options,
                                                            log))
    refit = _refit_tokens(options)
    default = options.token_default or PRUNE_TOKENS
    sums = refit_sum_bytes(layout, n_drop) if refit is not None and refit > (
        options.max_tokens or 0) else 0
    if options.max_tokens is not None and not sums:
        return options
    rebuild = reconstruct_bytes(layout, n_drop, refit if sums else 0) \
        if _reconstruct_steps(layout, options, source) else 0
    found = calibration_tokens(source, layout, n_drop=n_drop, dtype=options.run.dtype,
                               device=options.run.device, max_memory=options.run.max_memory,
                               requested=options.max_tokens, default=default,
                               fixed=sums + rebuild, experts_call=True)
    if rebuild and found.fixed + MIN_TOKENS * found.per_token > found.allowance:
        log(f"the experts' reconstruction ({human(rebuild)} per MoE layer) does not fit beside "
            "the weights: off (allow more with --max-memory)")
        options = replace(options, reconstruct_steps=0)
        found = calibration_tokens(source, layout, n_drop=n_drop, dtype=options.run.dtype,
                                   device=options.run.device, max_memory=options.run.max_memory,
                                   requested=options.max_tokens, default=default,
                                   fixed=sums, experts_call=True)
    need = found.fixed + MIN_TOKENS * found.per_token
    if sums and need > found.allowance:
        raise InvalidArgumentError(
            f"--refit-tokens {refit}: its sums ({human(sums)}) and the smallest selection "
            f"need about {human(need)} per MoE layer, {human(max(found.allowance, 0))} is left "
            "beside the weights", "drop --refit-tokens, or allow more with --max-memory")
    if options.max_tokens is not None:  # an explicit count is used as given, without a note
        return options
    if found.note():
        log(found.note())
    return replace(options, max_tokens=found.tokens)


def _auto_refit(source: Path, layout: Any, n_drop: int, options: DataOptions,
                log: Callable[[str], None]) -> int | None:
    """The default streamed positions of the down refit and the reconstruction: REFIT_FACTOR
    times the selection's (given or default) count, when their sums and sample leave that
    selection room beside the weights; else None (the selection's own), said in one line."""
    selection = options.max_tokens or options.token_default or PRUNE_TOKENS
    refit = REFIT_FACTOR * selection
    fixed = refit_sum_bytes(layout, n_drop) + reconstruct_bytes(layout, n_drop, refit)
    found = calibration_tokens(source, layout, n_drop=n_drop, dtype=options.run.dtype,
                               device=options.run.device, max_memory=options.run.max_memory,
                               requested=selection, fixed=fixed, experts_call=True)
    if found.fixed + selection * found.per_token <= found.allowance:
        return refit
    log(f"refit and reconstruction on the selection's positions only: streaming {refit} "
        f"would need {human(fixed)} per MoE layer beside the weights (allow more with "
        "--max-memory, or set --refit-tokens)")
    return None


def _refit_tokens(options: DataOptions) -> int | None:
    """The streamed refit's positions, when a down refit may run without neuron trimming."""
    if options.compensate is False or options.width is not None:
        return None
    return options.refit_tokens


def _setup(cal: Any, stats: Any, fingerprint: str, criterion: str, ratio: float,
           guard: dict[int, list[int]], min_experts: int | None,
           options: DataOptions) -> tuple[list[Candidate], Search | None]:
    """The stats candidates (plans known before the run) and the measured search, if any."""
    layout = cal.layout
    if criterion in CRITERIA:
        return [Candidate(criterion, build_plan(
            layout, fingerprint, criterion=criterion, ratio=ratio, stats=stats, protect=guard,
            min_experts=min_experts))], None
    stats_plans = stats_candidates(cal, stats, fingerprint, ratio, guard, min_experts) \
        if criterion == "auto" else []
    search = _search(layout, drop_count(ratio, layout.moe_layers[0].num_experts), guard,
                     options, cal.engine.path)
    return stats_plans, search


def _search(layout: Any, n_drop: int, guard: dict[int, list[int]],
            options: DataOptions, source: Path) -> Search:
    """The measured search's settings from the options."""
    return Search(n_drop, options.beam or 1, options.compensate is not False, options.width,
                  guard, options.router, _reconstruct_steps(layout, options, source),
                  options.reconstruct_progress)


def _reconstruct_steps(layout: Any, options: DataOptions, source: Path) -> int:
    """Steps of the whole-expert reconstruction: with the down refit, when every MoE layer's
    gate/up tensors can be written back (`surgery.experts.writable_format`: plain, or a
    quantized format moekit re-encodes)."""
    if options.compensate is False or options.width is not None or \
            not options.reconstruct_steps:
        return 0
    checkpoint = Checkpoint(source)
    try:
        for layer in layout.moe_layers:
            writable_format(layout, layer, checkpoint)
    except UnsupportedModelError:
        return 0
    return options.reconstruct_steps


def _info(cal: Any, options: DataOptions, found: dict[int, list[int]],
          start: float) -> dict[str, Any]:
    return {"sources": {s.name: str(s.path) for s in options.data.sources},
            "data_hash": cal.data_hash, "fraction": list(options.data.fraction),
            "seq_len": options.data.seq_len, "max_tokens": options.max_tokens, "beam": options.beam,
            "spread": options.spread, "refit_tokens": cal.refit_tokens or options.max_tokens,
            "refit_router": options.router, "reconstruct_steps": options.reconstruct_steps,
            "effort": options.effort, "reconstruct_forwards": options.reconstruct_forwards,
            "selection": options.selection, "refit_positions": cal.max_tokens
            if options.selection else None,
            "held_out_windows": len(cal.held),
            "super_experts": {str(k): v for k, v in found.items()},
            "runtime": cal.engine.describe(), "seconds": round(time.perf_counter() - start, 1)}


def _lanes(stats_plans: list[Candidate], search: Search | None, options: DataOptions,
           original: bool = True) -> list[Lane]:
    """The run's lanes, unmodified and unrefitted ones first (see `lanes`); without
    `original` the refit's reference residuals come from the statistics pass
    (`_records_reference`)."""
    lanes = [Lane("reference", held=True)]
    lanes += [Lane(c.name, held=True, keep={p.layer: p.kept for p in c.plan.layers})
              for c in stats_plans]
    if search is None:
        return lanes
    refit = needs_refit(search.n_drop, search.compensate, search.width)
    fitted = search.compensate or search.width is not None
    if refit and original:
        lanes.insert(0, Lane("original", held=False))
    if fitted and options.compensate is None and options.width is None:
        lanes.append(Lane("measured", held=True, measured=True))
    lanes.append(Lane("pruned", held=False, measured=True, refitted=fitted))
    if _both_routers(search, options):
        lanes.append(Lane(DOWN_ONLY, held=True, measured=True, refitted=True, router=False))
    lanes.append(Lane(_measured_name(search), held=True, measured=True, refitted=fitted))
    return lanes


def _both_routers(search: Search, options: DataOptions) -> bool:
    """Default compensation with the router refit: also score the down refits alone."""
    return search.router and search.compensate and options.compensate is None and \
        options.width is None


def _measured_name(search: Search) -> str:
    if search.width is not None:
        return f"measured+trim{search.width}"
    return "measured+compensate" if search.compensate else "measured"


def _measured(cal: Any, fingerprint: str, run: LaneRun, search: Search, options: DataOptions,
              min_experts: int | None) -> list[Candidate]:
    """The measured candidate (with its refits) and, when compensation is on by default, the
    same selection without refits."""
    measured = measured_plan(cal, fingerprint, run.results, compensate=search.compensate,
                             protect=search.protect, min_experts=min_experts,
                             width=search.width)
    out = [measured]
    if _both_routers(search, options):
        out.append(Candidate(DOWN_ONLY, _copy_plan(measured.plan, DOWN_ONLY), measured.weights,
                             measured.rel_change, seconds=measured.seconds,
                             layers=measured.layers, gate_up=measured.gate_up))
    if search.compensate and options.compensate is None and options.width is None:
        plain = Candidate("measured", _copy_plan(measured.plan, "measured"),
                          seconds=measured.seconds, layers=measured.layers)
        out.append(plain)
    return out


def _log_layer(r: Any, log: Callable[[str], None]) -> None:
    fit = f", refit held-out {r.fit.held_before:.4g} -> {r.fit.held_after:.4g}" \
        if r.fit and r.fit.weights else ""
    if r.rebuild is not None:
        fit += f", reconstructed -> {r.rebuild.held_after:.4g} ({r.rebuild.best_step} steps)"
    if r.router is not None and r.router.changed:
        fit += (f", router ({r.router.method}, alpha {r.router.alpha:g}) "
                f"{r.router.held_before:.4g} -> {r.router.held_after:.4g}")
    elif r.router is not None and r.router.note:
        fit += f", router not refitted: {r.router.note}"
    log(f"  layer {r.layer}: drop {r.dropped} (D = {r.error:.4g}{fit}; {r.seconds:.0f} s)")


def _copy_plan(plan: Any, criterion: str) -> Any:
    copy = PrunePlan.from_dict(plan.to_dict())
    copy.criterion = criterion
    return copy
