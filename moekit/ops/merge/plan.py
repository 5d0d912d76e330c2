"""A merge plan: which routed experts fold into which, per MoE layer, with what weights.

Layer l with E experts becomes E' = E - n experts. Cluster i (new expert id i) lists original
expert ids, its *centre* first; clusters are ordered by centre id, so new id i = i-th smallest
centre and the router keeps the centres' order (and their routing groups). `weights[i]` are the
merge weights of the members (usage shares p_j / sum p, summing to 1). Plans round-trip through
JSON and are re-validated against the checkpoint, through the prune plan's checks (centres play
the role of the kept experts).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import InvalidArgumentError
from moekit.surgery.plan import LayerPlan, PrunePlan, load_json, save_json, validate_plan

if TYPE_CHECKING:
    from moekit.families.layout import ModelLayout

MERGE_PLAN_VERSION = 1
GROUPINGS = {
    "hc-smoe": "hierarchical clustering (average linkage) of the experts' mean outputs over the "
               "calibration tokens (HC-SMoE)",
    "m-smoe": "dominant experts (highest --criterion) as centres; every other expert joins the "
              "centre whose router-logit column is most similar (M-SMoE)",
    "weight": "hierarchical clustering (average linkage) on the cosine similarity of the "
              "flattened expert weights (data-free)",
}
METHODS = {
    "average": "usage-weighted average of the members' weights",
    "aligned": "usage-weighted average after permuting each member's intermediate neurons to "
               "match the centre's (assignment solver on gate/up rows and down columns)",
    "fit": "aligned average for gate/up; the down projection re-fitted by ridge least squares "
           "on calibration activations so the merged expert's gate-weighted output reproduces "
           "what its cluster contributed to the original layer (under the merged router)",
    "fit-centre": "the centre's gate/up kept (dominant expert, as HC-SMoE's fix-dom); its down "
                  "projection re-fitted like `fit` to absorb the folded experts' output",
    "fit-layer": "each cluster is written as its centre expert (gate/up and router row "
                 "unchanged) with its down projection refitted to absorb the cluster's "
                 "function: the down projections of all merged experts are refitted together "
                 "to the unmerged layer's output (plus the residual-stream drift) under the "
                 "merged router's routing, layer by layer on the hidden states of the model "
                 "merged so far (prune --data's compensation; --router centre); the refits are "
                 "written only if they lower the held-out KL, else the centres as they are",
}
WRITTEN = {  # what each new expert is, in one line (plan table caption, model card)
    "average": "each new expert is the usage-weighted average of its cluster's members",
    "aligned": "each new expert is the usage-weighted average of its cluster's members, "
               "neurons aligned to the centre's",
    "fit": "each new expert is its cluster's aligned average with the down projection refitted "
           "to reproduce the cluster's output",
    "fit-centre": "each new expert is its cluster's centre (the first id) with the down "
                  "projection refitted to absorb the cluster's output",
    "fit-layer": "each new expert is its cluster's centre (the first id): gate/up and router row "
                 "copied, the down projection refitted to absorb the cluster's function (all "
                 "merged experts' down projections refitted together, layer by layer)",
}
FIT_METHODS = ("fit", "fit-centre")  # cluster-local fits on the unmodified model's activations
LAYER_FITS = ("fit-layer",)  # whole-layer, sequential refit (`refit.py`)
ROUTERS = {
    "centre": "the centre expert's router row, router bias and selection bias",
    "usage": "usage-weighted average of the members' router rows and biases",
    "fit": "rows fitted by ridge least squares to the log-sum-exp of the members' logits on "
           "calibration tokens (the cluster's summed softmax mass); centre's selection bias",
}


@dataclass
class MergeLayer:
    """One MoE layer: clusters (centre first) ordered by centre id, and member weights."""

    layer: int
    num_experts: int
    clusters: list[list[int]]
    weights: list[list[float]]

    @property
    def centres(self) -> list[int]:
        return [c[0] for c in self.clusters]

    @property
    def folded(self) -> list[int]:
        return sorted(j for c in self.clusters for j in c[1:])

    def as_layer_plan(self) -> LayerPlan:
        return LayerPlan(self.layer, self.num_experts, self.centres, self.folded)


@dataclass
class MergePlan:
    """The whole decision (grouping, merge method, router policy, clusters per layer)."""

    group: str
    method: str
    router: str
    criterion: str
    ratio: float
    family: str
    top_k: int
    model_fingerprint: str
    layers: list[MergeLayer]
    stats_sha256: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    config_changes: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    protected: dict[int, list[int]] = field(default_factory=dict)  # kept out of every cluster

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts if self.layers else 0

    @property
    def num_kept(self) -> int:
        return len(self.layers[0].clusters) if self.layers else 0

    def layer(self, index: int) -> MergeLayer:
        return next(p for p in self.layers if p.layer == index)

    def as_prune_plan(self) -> PrunePlan:
        """The pruning that keeps the centres: same routing, config and validity checks."""
        return PrunePlan(criterion=f"merge:{self.group}", ratio=self.ratio, family=self.family,
                         top_k=self.top_k, model_fingerprint=self.model_fingerprint,
                         layers=[p.as_layer_plan() for p in self.layers],
                         stats_sha256=self.stats_sha256, config_changes=self.config_changes,
                         warnings=list(self.warnings))

    def to_dict(self) -> dict[str, Any]:
        return {"moekit_merge_plan": MERGE_PLAN_VERSION, **asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any], source: str = "plan") -> MergePlan:
        try:
            if data.get("moekit_merge_plan") != MERGE_PLAN_VERSION:
                raise KeyError("moekit_merge_plan")
            layers = [MergeLayer(int(p["layer"]), int(p["num_experts"]),
                                 [[int(j) for j in c] for c in p["clusters"]],
                                 [[float(w) for w in c] for c in p["weights"]])
                      for p in data["layers"]]
            return MergePlan(
                group=str(data["group"]), method=str(data["method"]), router=str(data["router"]),
                criterion=str(data["criterion"]), ratio=float(data["ratio"]),
                family=str(data["family"]), top_k=int(data["top_k"]),
                model_fingerprint=str(data["model_fingerprint"]), layers=layers,
                stats_sha256=data.get("stats_sha256"),
                calibration=dict(data.get("calibration") or {}),
                config_changes=dict(data.get("config_changes") or {}),
                warnings=list(data.get("warnings") or []),
                protected={int(k): [int(j) for j in v]
                           for k, v in (data.get("protected") or {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InvalidArgumentError(f"{source} is not a moekit merge plan (bad or missing "
                                       f"field {err})", "write one with --dry-run --plan-out"
                                       ) from err

    def save(self, path: Path) -> Path:
        return save_json(path, self.to_dict())

    @staticmethod
    def load(path: Path) -> MergePlan:
        return MergePlan.from_dict(load_json(path, "a moekit merge plan"), str(path))


def check_choices(group: str, method: str, router: str) -> None:
    """Fail on unknown --group/--method/--router names before any work."""
    for option, value, known in (("--group", group, GROUPINGS), ("--method", method, METHODS),
                                 ("--router", router, ROUTERS)):
        if value not in known:
            raise InvalidArgumentError(f"unknown {option} '{value}'",
                                       f"use one of {', '.join(known)}")
    if method in LAYER_FITS and router != "centre":
        raise InvalidArgumentError(f"--method {method} with --router {router}: the refit "
                                   "assumes the merged router routes like the centres",
                                   "use --router centre (the default)")


def validate_merge_plan(plan: MergePlan, layout: ModelLayout, fingerprint: str,
                        ignore_fingerprint: bool = False) -> MergePlan:
    """Check clusters (a partition of every layer's experts, centre first, ordered by centre,
    weights that match) and everything a prune plan keeping the centres must satisfy."""
    check_choices(plan.group, plan.method, plan.router)
    for p in plan.layers:
        members = sorted(j for c in p.clusters for j in c)
        if members != list(range(p.num_experts)) or any(not c for c in p.clusters):
            raise InvalidArgumentError(f"plan layer {p.layer}: clusters {p.clusters} must split "
                                       f"ids 0-{p.num_experts - 1} exactly once")
        if p.centres != sorted(p.centres):
            raise InvalidArgumentError(f"plan layer {p.layer}: clusters must be ordered by "
                                       "their centre (first id)")
        if [len(w) for w in p.weights] != [len(c) for c in p.clusters] or any(
                not 0 <= w < math.inf for ws in p.weights for w in ws):  # NaN fails too
            bad = [w for ws in p.weights for w in ws if not 0 <= w < math.inf]
            raise InvalidArgumentError(f"plan layer {p.layer}: weights must give one finite "
                                       "non-negative number per cluster member"
                                       + (f", got {bad[0]}" if bad else ""),
                                       "fix the plan's weights or write a new one with "
                                       "--dry-run --plan-out")
    pruned = validate_plan(plan.as_prune_plan(), layout, fingerprint, ignore_fingerprint)
    plan.config_changes, plan.warnings = pruned.config_changes, pruned.warnings
    return plan
