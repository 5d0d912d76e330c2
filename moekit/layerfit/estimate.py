"""The time and memory of a calibrated prune or merge, predicted before the work from a probe.

The probe (`probe`) runs PROBE_POSITIONS calibration positions (whole windows, at least two)
through the model once, layer by layer (streamed: only up to the first MoE layer, so the
checkpoint is not read once more, its time scaled to all layers; `--effort fast`:
FAST_PROBE_POSITIONS, and only up to the first MoE layer in memory too), with that layer
captured on the way; on that capture it times the layer's measured selection (and down
refit, when the run refits) and a few reconstruction steps. From these per-position and
per-step times and the run's counts, `predict` adds up (seconds; N the selection's positions,
N_e the streamed refit's extra positions, N_h the held-out positions, N_g the merge's grouping
sample (one more lane through the unmodified model, captured up to the router: counted as a
whole capture), L the MoE layers):

    statistics pass   N_s x forward (N_s: the statistics' positions, N unless `--effort fast`)
    lanes             (fit lanes x (N + N_e) + held lanes x N_h + N_g) x forward
    captures          L x (captured lanes x N + 2 N_e + N_g) x one layer's capture
    search, refit     L x (N + N_e) x the probe's per-position selection (+ refit) time
    reconstruction    L x (steps x step time + checks), a step of min(BATCH, 3/4 (N + N_e))
                      positions
    write             checkpoint bytes / WRITE_RATE

Everything but the reconstruction's early stop scales linearly with the positions; the
reconstruction is counted at its step cap (an early stop shortens the run). On
the fixture the estimate was 1.3-1.5x low (docs/benchmarks.md). Peak
memory: the resident set after the probe plus one MoE layer's working set at N positions
(`layerfit.tokens`) and the lanes' hidden states (N·H values per lane and layer boundary).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

from moekit.calib.capture import capture_step
from moekit.families.registry import first_value
from moekit.layerfit.measured import measure_layer
from moekit.layerfit.reconstruct import BATCH, CHECK_EVERY, reconstruct_layer
from moekit.layerfit.tokens import experts_call_bytes, per_token_bytes, reconstruct_bytes
from moekit.units import human

PROBE_POSITIONS = 2048
FAST_PROBE_POSITIONS = 1024  # `--effort fast`'s probe: its whole run is ~2-3 forward passes
PROBE_STEPS = (2, 6)  # reconstruction steps timed: their difference is the per-step time
WRITE_RATE = 200e6  # bytes per second of the writer (a lower bound of the measured copy rate)


@dataclass
class Probe:
    """Measured seconds: `forward` and `capture` per position (whole model; one MoE layer's
    capture), `select` per position (selection and, when asked, the down refit of one layer),
    `step` per reconstruction step of BATCH positions (0 when not timed); `seconds` the probe's
    own wall time."""

    forward: float
    capture: float
    select: float
    step: float
    seconds: float


@dataclass
class Estimate:
    """Predicted wall seconds of the rest of the run per stage and peak resident bytes."""

    stages: dict[str, float] = field(default_factory=dict)
    peak_bytes: int = 0
    probe: Probe | None = None

    @property
    def seconds(self) -> float:
        return sum(self.stages.values())

    def line(self) -> str:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in self.stages.items() if v >= 0.5)
        probe = f"; probe {self.probe.seconds:.1f} s" if self.probe else ""
        return (f"estimate: about {_duration(self.seconds)} and {human(self.peak_bytes)} peak "
                f"memory ({parts}{probe})")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def probe(cal: Any, *, n_drop: int, beam: int, refit: bool, reconstruct: bool,
          select: bool = True, fixed: bool = False) -> Probe:
    """Time the first PROBE_POSITIONS calibration positions through the model and one MoE
    layer's capture, selection (+ down refit) and reconstruction steps (module docstring);
    without `select` (a stats criterion) only the forward and the capture; with `fixed` the
    layer keeps its first E - n_drop experts (no search: the refit of a stats plan) and the
    probe is `fast`'s: FAST_PROBE_POSITIONS, the run stopped after that layer in memory too
    (its forward time scaled to all layers, as streamed)."""
    began = time.perf_counter()
    windows = _probe_windows(cal.fit, FAST_PROBE_POSITIONS if fixed else PROBE_POSITIONS)
    positions = sum(int(w.numel()) for w in windows)
    first = cal.blocks[0]
    got: dict[str, float] = {}

    def on_layer(step: Any) -> None:
        if step.index != first.layer or got:
            return
        start = time.perf_counter()
        cap = capture_step(step, first, range(len(windows)), max_tokens=positions,
                           logits_index=cal.family.router.logits_index, residual=refit)
        got["capture"] = time.perf_counter() - start
        if select:
            got.update(_time_layer(cal, first, cap, n_drop, beam, refit, reconstruct, fixed))

    stop = cal.engine.mode == "stream" or fixed
    start = time.perf_counter()
    try:
        for _ in cal.engine.run(windows, on_layer=on_layer,
                                after_layer=_stop_after(first.layer) if stop else None):
            pass
    except _ProbeDone:
        pass
    whole = time.perf_counter() - start
    spent = got.get("capture", 0.0) + got.get("select", 0.0) + got.get("rebuild", 0.0)
    share = _layer_count(cal) / (first.layer + 1) if stop else 1.0
    return Probe(max(whole - spent, 1e-9) * share / positions, got.get("capture", 0.0) / positions,
                 got.get("select", 0.0) / positions, got.get("step", 0.0),
                 time.perf_counter() - began)


class _ProbeDone(Exception):
    """Ends a streamed probe after its MoE layer (the engine frees the layer on the way out)."""


def _stop_after(layer: int) -> Any:
    """Streamed: stop the probe's run after `layer`, so that it reads only the layers up to
    it (and the one prefetched), not the whole checkpoint once more; the forward time of the
    layers run is scaled to all layers."""
    def after(step: Any) -> None:
        if step.index >= layer:
            raise _ProbeDone
    return after


def _layer_count(cal: Any) -> int:
    from moekit.runtime.layers import find_stack

    return len(find_stack(cal.model).layers)


def _probe_windows(fit: list[Any], positions: int = PROBE_POSITIONS) -> list[Any]:
    """The leading windows holding `positions` positions (at least two windows)."""
    out, seen = [], 0
    for window in fit:
        if seen >= positions and len(out) >= 2:
            break
        out.append(window)
        seen += int(window.numel())
    return out


def _time_layer(cal: Any, block: Any, cap: Any, n_drop: int, beam: int, refit: bool,
                reconstruct: bool, fixed: bool = False) -> dict[str, float]:
    """Seconds of one layer's selection (+ refit) on the capture, and per reconstruction step
    (scaled to BATCH positions)."""
    start = time.perf_counter()
    found = measure_layer(cal, block, cap, n_drop, beam=beam, compensate=refit,
                          protected=frozenset(), width=None, reference=cap.residual,
                          kept=list(range(block.experts.num_experts - n_drop)) if fixed else None)
    out = {"select": time.perf_counter() - start}
    if not (reconstruct and refit and n_drop):
        return out
    import torch

    kept = found.kept
    logits = cap.logits[:, kept].float()
    k = int(cal.layout.top_k())
    gates, local = torch.topk(logits.softmax(-1), k, dim=-1)
    ids = torch.as_tensor(kept)[local]
    target = cap.residual.float() if cap.residual is not None else cap.inputs.float()
    times = []
    for steps in PROBE_STEPS:
        start = time.perf_counter()
        reconstruct_layer(block.layer, block.experts, cap.inputs, ids, gates, target, kept,
                          steps)
        times.append(time.perf_counter() - start)
    fitted = max(1, int(cap.inputs.shape[0] * 0.75))
    out["step"] = max(times[1] - times[0], 0.0) / (PROBE_STEPS[1] - PROBE_STEPS[0]) * \
        BATCH / min(BATCH, fitted)
    out["rebuild"] = sum(times)
    return out


@dataclass(frozen=True)
class RunShape:
    """What the run will do: positions (selection N, extra streamed N_e, held out N_h), lanes
    (fit lanes, held lanes, lanes captured per MoE layer), reconstruction step cap, MoE
    layers, checkpoint bytes, the statistics pass's positions (0: N), the merge's grouping
    sample N_g (0: none)."""

    positions: int
    extra: int
    held: int
    fit_lanes: int
    held_lanes: int
    captured: int
    steps: int
    moe_layers: int
    checkpoint_bytes: int
    stats_positions: int = 0
    sample: int = 0


def predict(found: Probe, shape: RunShape) -> dict[str, float]:
    """Seconds per stage (module docstring)."""
    n, extra, layers = shape.positions, shape.extra, shape.moe_layers
    capture_layer = found.capture * shape.captured * n
    rebuild = 0.0
    if shape.steps and found.step:
        fitted = max(1.0, 0.75 * (n + extra))  # a step draws min(BATCH, fitted) positions
        checks = (shape.steps // CHECK_EVERY + 1) * found.step * 0.25 * (n + extra) / (3 * BATCH)
        rebuild = shape.steps * found.step * min(BATCH, fitted) / BATCH + checks
    return {"statistics": found.forward * (shape.stats_positions or n),
            "lanes": found.forward * (shape.fit_lanes * (n + extra) + shape.held_lanes *
                                      shape.held + shape.sample),
            "capture": layers * (capture_layer + found.capture * (2 * extra + shape.sample)),
            "search+refit": layers * found.select * (n + extra) * bool(shape.captured),
            "reconstruction": layers * rebuild,
            "write": shape.checkpoint_bytes / WRITE_RATE}


def peak_memory(cal: Any, shape: RunShape, n_drop: int, itemsize: int) -> int:
    """The resident set now (the model, the tokens, the probe's peak) plus one MoE layer's
    working set at the run's positions and the lanes' hidden states."""
    layout = cal.layout
    hidden = int(first_value(layout.config, ("hidden_size", "d_model", "n_embd")))
    bias = bool(layout.moe_layers[0].selection_bias)
    layer = per_token_bytes(layout, n_drop, itemsize, bias) * shape.positions + \
        experts_call_bytes(layout, itemsize)
    if shape.steps:
        layer += reconstruct_bytes(layout, n_drop, shape.extra and shape.positions + shape.extra)
    lanes = 2 * hidden * itemsize * (shape.fit_lanes * (shape.positions + shape.extra) +
                                     shape.held_lanes * shape.held)
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(now + layer + lanes)
