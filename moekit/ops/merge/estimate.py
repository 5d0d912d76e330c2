"""The time and memory of the merge's measured run, predicted as it starts (`layerfit.estimate`).

Once the refit's calibration is open (model loaded, tokens read; the statistics pass, when
there is one, is done by then), a probe times PROBE_POSITIONS positions through the model and
one MoE layer's capture and refit of a fixed set of centres (`probe(fixed=True)`: what
`fit-layer` does, no search). `predict` then counts the run `refit.sequential_refit` makes:

    lanes     `original` and `pruned` over the N fitted positions (+ N_e streamed), `reference`,
              `centres`, `refitted` over the N_h held-out ones, the grouping sample N_g
              (`onepass.py`) once more through the unmodified model
    captures  `original` and `pruned` per MoE layer, and the grouping sample's
    refit     per MoE layer, the probe's per-position refit time x (N + N_e)
    write     checkpoint bytes / WRITE_RATE
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.layerfit.estimate import Estimate, RunShape, peak_memory, predict, probe

FIT_LANES, HELD_LANES, CAPTURED = 2, 3, 2  # `refit.sequential_refit`'s lanes


def estimate_refit(cal: Any, source: Path, n_drop: int, sample: int) -> Estimate:
    """Probe `cal` (a `layerfit.measured.Calibration`) and predict the measured run that keeps
    E - `n_drop` centres per layer, with a grouping sample of `sample` positions (0: the
    clusters are known)."""
    saved = dict(cal.engine.info)  # the probe's run is not the run the provenance records
    try:
        found = probe(cal, n_drop=n_drop, beam=1, refit=True, reconstruct=False, fixed=True)
    finally:
        cal.engine.info.clear()
        cal.engine.info.update(saved)
    shape = RunShape(sum(int(w.numel()) for w in cal.fit), sum(int(w.numel()) for w in cal.extra),
                     sum(int(w.numel()) for w in cal.held), FIT_LANES, HELD_LANES, CAPTURED, 0,
                     len(cal.layout.moe_layers),
                     sum(p.stat().st_size for p in Path(source).glob("*.safetensors")),
                     sample=sample)
    stages = predict(found, shape)
    stages.pop("statistics")  # done before the measured run starts (or `--stats` was given)
    stages.pop("reconstruction")
    stages["refit"] = stages.pop("search+refit")
    stages["write"] = stages.pop("write")
    itemsize = int(getattr(cal.model.dtype, "itemsize", 4))
    return Estimate(stages, peak_memory(cal, shape, n_drop, itemsize), found)
