"""Whole-layer, sequential refit of the merged experts (`--method fit-layer`).

Under `--router centre` a merged layer routes exactly like the layer pruned to its centres, so
its routed output on token t is y'(t) = sum_{i in T'(t)} a_i(t) (W_i h_i(t) + b_i) over the E'
merged experts, with T', a the merged router's own re-routed top-k and gates. `fit-layer`
keeps every centre's gate/up (h_i) and refits the down projections W_i of **all E'** merged
experts together with the compensation of `prune --data` (`layerfit.compensate.refit_layer`:
one Gauss-Seidel sweep of ridge solves, busiest expert first):

    target(t) = y_E(t) + d(t),     y_E the unmerged layer's routed output,
    d(t) = (original model's residual stream) - (merged model's) at this layer's output,

so every folded expert's share, whichever merged expert its tokens are re-routed to, is
absorbed by the whole layer, and what earlier merged layers changed is absorbed too. The ridge
weight alpha is chosen on a held-out quarter of the layer's tokens; a layer whose held-out error
no alpha lowers keeps its centres unchanged.

As `prune --data` does, the whole merge is also scored end to end: the last 20 % of each
source's windows (never fitted on) run through the unmerged model, the merged model without
refits (the centres) and the refitted one, and the refits are kept only when they lower the
mean next-token KL(unmerged || merged) there; otherwise the checkpoint is the centres alone
(with too little data for a held-out window, the per-layer choice stands).

Sequential: the layers are fitted in order in one layered run of `moekit.runtime` (in memory,
or streamed one decoder layer at a time under `max_memory`), each on the hidden states of the
model merged (and refitted) so far (`layerfit.lanes`: the `original` and `pruned` lanes; each
layer keeps exactly the plan's centres, `measure_layer(kept=...)`, no search). Refitted
down projections [H, I] (float32) are spilled to disk, one file per layer, and read back by the
surgery one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.calib.spec import DataSpec
from moekit.errors import InvalidArgumentError
from moekit.layerfit.lanes import Lane, LaneRun, Search
from moekit.layerfit.measured import grouping, load_calibration
from moekit.ops.merge.calib import MAX_TOKENS, SEQ_LEN
from moekit.ops.merge.plan import check_choices
from moekit.runtime.engine import mode_line
from moekit.runtime.groups import require_whole_layers
from moekit.runtime.options import RunOptions
from moekit.runtime.spill import TensorSpill

if TYPE_CHECKING:
    import torch

    from moekit.calib.data import DataSource
    from moekit.families.layout import ModelLayout
    from moekit.ops.merge.plan import MergePlan


@dataclass
class LayerRefits:
    """`refits(layer)`: {centre id: refitted down [H, I]} (lazy, read on access; only the
    experts the sweep changed); `info[layer]`: alpha and held-out errors before/after;
    `runtime`: what the engine ran (memory or streamed)."""

    weights: dict[int, Mapping[int, torch.Tensor]] = field(default_factory=dict)
    info: dict[int, dict[str, Any]] = field(default_factory=dict)
    spill: Any = None
    runtime: dict[str, Any] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)

    def __call__(self, layer: int) -> Mapping[int, torch.Tensor]:
        return self.weights.get(layer, {})

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "kl_held_out": self.kl,
                "kept": bool(self.weights),
                "layers": {str(k): v for k, v in sorted(self.info.items())}}


# the refit's settings when not given (`open_refit` makes the RunOptions and DataSpec of them)
REFIT_DEFAULTS: dict[str, Any] = {"fraction": (0.0, 1.0), "seq_len": SEQ_LEN,
                                  "max_tokens": MAX_TOKENS, "device": "cpu",
                                  "dtype": "auto", "max_memory": "auto",
                                  "text_field": "text", "tokenizer": None,
                                  "trust_remote_code": False}


def refit_merged(source: Path, layout: ModelLayout, plan: MergePlan, sources: list[DataSource],
                 *, log: Callable[[str], None] | None = None, **options: Any) -> LayerRefits:
    """Refit the merged layers of `plan` in order (module doc) on at most `max_tokens` token
    positions of `sources` per layer (windows of `seq_len`); `options`: REFIT_DEFAULTS keys."""
    check_choices(plan.group, plan.method, plan.router)
    n_drop = plan.num_experts - plan.num_kept
    if n_drop == 0:
        return LayerRefits()
    check_refit_grouping(layout, plan.num_experts, n_drop, plan.config_changes)
    cal = open_refit(source, layout, sources, log=log, **options)
    return sequential_refit(cal, n_drop, {p.layer: p.centres for p in plan.layers}, log=log)


def check_refit_grouping(layout: ModelLayout, num_experts: int, n_drop: int,
                         config_changes: dict[str, int]) -> None:
    """The refit routes the merged layers as `layerfit.measured.grouping` says; refuse plans whose
    centres need other routing-group changes."""
    if grouping(layout, num_experts, n_drop)[1] != config_changes:
        raise InvalidArgumentError(
            "--method fit-layer: the plan's centres are not spread over the routing groups as "
            "the refit's routing assumes", "use --method fit-centre for this plan")


def open_refit(source: Path, layout: ModelLayout, sources: list[DataSource], *,
               log: Callable[[str], None] | None = None, **options: Any) -> Any:
    """`layerfit.measured.load_calibration` (tokenised data, the engine) for the refit."""
    settings = {**REFIT_DEFAULTS, **options}
    run = RunOptions(*(settings.pop(k) for k in ("device", "dtype", "max_memory",
                                                 "trust_remote_code")))
    data = DataSpec(tuple(sources), *(settings.pop(k) for k in ("fraction", "text_field",
                                                                "tokenizer", "seq_len")))
    cal = load_calibration(source, layout, data, run=run, **settings)
    if log is not None:
        log(mode_line(cal.engine))
    require_whole_layers(cal.engine, "--method fit-layer")
    return cal


def sequential_refit(cal: Any, n_drop: int, centres: dict[int, list[int]], *,
                     log: Callable[[str], None] | None = None,
                     make_run: Callable[..., Any] | None = None) -> LayerRefits:
    """The layered refit run on `cal` (a `layerfit.measured.Calibration`) keeping `centres`
    {layer: ids}. `make_run(cal, lanes, search, spill, on_result)`: the `lanes.LaneRun` to
    use (default LaneRun itself; `onepass.SharedRun` fills in `centres` as each layer
    starts)."""
    search = Search(n_drop, compensate=True, router=False, kept=centres)
    lanes = [Lane("original", held=False), Lane("reference", held=True),  # unrefitted first
             Lane("centres", held=True, measured=True),
             Lane("pruned", held=False, measured=True, refitted=True),
             Lane("refitted", held=True, measured=True, refitted=True)]
    refits = LayerRefits(spill=TensorSpill("moekit-merge-refits-", cal.engine.spill_dir),
                         runtime=cal.engine.describe())

    def on_result(result: Any) -> None:
        fit = result.fit
        refits.weights[result.layer] = fit.weights if fit.weights else {}
        refits.info[result.layer] = {"alpha": fit.alpha, "held_out_before": fit.held_before,
                                     "held_out_after": fit.held_after,
                                     "refitted": sorted(int(e) for e in fit.rel_change)}
        if log is not None:
            log(f"  layer {result.layer}: refit held-out {fit.held_before:.4g} -> "
                f"{fit.held_after:.4g} (alpha {fit.alpha})")

    scores = (make_run or LaneRun)(cal, lanes, search, refits.spill, on_result).run()
    refits.kl = {name: scores.mean(name)[0] for name in ("centres", "refitted")}
    if log is not None:
        log(f"held-out KL: centres {refits.kl['centres']:.5f}, refitted "
            f"{refits.kl['refitted']:.5f}")
    if cal.held and refits.kl["refitted"] >= refits.kl["centres"]:
        refits.weights = {}  # the refits do not help end to end: write the centres alone
    return refits
