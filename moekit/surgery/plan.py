"""A pruning plan: which routed experts each MoE layer keeps, why, and for which model.

The plan is the decision; surgery only executes it. New expert id i is `kept[i]` (kept ids are
sorted), so the renumbering is implied. Plans round-trip through JSON and are re-validated
against the checkpoint they are applied to.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import InvalidArgumentError
from moekit.families.registry import first_value

if TYPE_CHECKING:
    from moekit.families.layout import ModelLayout
    from moekit.stats.expert_stats import ExpertStats

PLAN_VERSION = 1
SHARE_COLUMNS = ("traffic_removed", "weight_removed")
GROUPING = "grouped routing"


@dataclass
class LayerPlan:
    """One MoE layer (decoder layer index `layer`): kept and dropped original expert ids and the
    criterion value of every expert (None for explicit plans). `removed_shares`: the share of
    calibration traffic/weight the dropped experts had when the plan was made (budget_rows keys),
    so a saved plan shows its cost without the statistics."""

    layer: int
    num_experts: int
    kept: list[int]
    dropped: list[int]
    scores: list[float] | None = None
    removed_shares: dict[str, float] = field(default_factory=dict)

    @property
    def old_to_new(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}


@dataclass
class PrunePlan:
    """The whole decision. `config_changes` holds routing keys to rewrite (grouped routing that
    cannot stay balanced: `{"n_group": 1, "topk_group": 1}`); `warnings` says why."""

    criterion: str
    ratio: float
    family: str
    top_k: int
    model_fingerprint: str
    layers: list[LayerPlan]
    stats_sha256: str | None = None
    domain: str | None = None
    seed: int | None = None
    min_experts: int | None = None
    protected: dict[int, list[int]] = field(default_factory=dict)
    config_changes: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts if self.layers else 0

    @property
    def num_kept(self) -> int:
        return len(self.layers[0].kept) if self.layers else 0

    @property
    def num_dropped(self) -> int:
        return self.num_experts - self.num_kept

    def layer(self, index: int) -> LayerPlan:
        return next(p for p in self.layers if p.layer == index)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["protected"] = {str(k): v for k, v in self.protected.items()}
        return {"moekit_plan": PLAN_VERSION, **data}

    @staticmethod
    def from_dict(data: dict[str, Any], source: str = "plan") -> PrunePlan:
        try:
            if data.get("moekit_plan") != PLAN_VERSION:
                raise KeyError("moekit_plan")
            layers = [LayerPlan(int(p["layer"]), int(p["num_experts"]),
                                [int(x) for x in p["kept"]], [int(x) for x in p["dropped"]],
                                p.get("scores"), dict(p.get("removed_shares") or {}))
                      for p in data["layers"]]
            return PrunePlan(
                criterion=str(data["criterion"]), ratio=float(data["ratio"]),
                family=str(data["family"]), top_k=int(data["top_k"]),
                model_fingerprint=str(data["model_fingerprint"]), layers=layers,
                stats_sha256=data.get("stats_sha256"), domain=data.get("domain"),
                seed=data.get("seed"), min_experts=data.get("min_experts"),
                protected={int(k): list(v) for k, v in (data.get("protected") or {}).items()},
                config_changes=dict(data.get("config_changes") or {}),
                warnings=list(data.get("warnings") or []))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise InvalidArgumentError(f"{source} is not a moekit prune plan (bad or missing "
                                       f"field {err})", "write one with --dry-run --plan-out"
                                       ) from err

    def record_budget(self, budget: list[dict[str, Any]]) -> None:
        """Keep the traffic/weight shares of `budget_rows` in the layers (for --plan-out)."""
        for p, row in zip(self.layers, budget, strict=True):
            p.removed_shares.update({k: float(row[k]) for k in SHARE_COLUMNS
                                     if row[k] == row[k]})  # NaN: no statistics

    def save(self, path: Path) -> Path:
        return save_json(path, self.to_dict())

    @staticmethod
    def load(path: Path) -> PrunePlan:
        return PrunePlan.from_dict(load_json(path, "a moekit prune plan"), str(path))


def save_json(path: Path, data: dict[str, Any]) -> Path:
    """Write a plan (or any JSON object) with indentation, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a plan file (one-line InvalidArgumentError when missing/malformed)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"plan file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InvalidArgumentError(f"plan file {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"plan file {path} is not {what}")
    return data


def drop_count(ratio: float, num_experts: int) -> int:
    """Experts removed per layer: floor(ratio * E + 0.5) (round half up)."""
    return int(math.floor(ratio * num_experts + 0.5 + 1e-9))


def check_remaining(remaining: int, num_experts: int, top_k: int, min_experts: int | None,
                    what: str) -> None:
    """Refuse counts a stock runtime cannot run (fewer than top-k) or below the user's floor."""
    if remaining < top_k:
        ratio = (num_experts - top_k) / num_experts
        raise InvalidArgumentError(
            f"top_k={top_k} but only {remaining} experts would remain ({what})",
            f"remove at most {num_experts - top_k} of {num_experts} (--ratio <= {ratio:.4g})")
    if min_experts is not None and remaining < min_experts:
        raise InvalidArgumentError(
            f"--min-experts {min_experts} but only {remaining} experts would remain ({what})",
            "lower --ratio or --min-experts")


# -- grouped routing (DeepSeek-V2/V3, GLM-4.5: n_group / topk_group) -------------------------

def group_count(layout: ModelLayout) -> int:
    """Groups the router limits top-k to (1 when routing is not group-limited)."""
    config = layout.config
    if not layout.family.router.grouped or config.get("topk_method") == "greedy":
        return 1
    return int(first_value(config, layout.family.keys.n_group, 1) or 1)


def group_feasible(layout: ModelLayout, kept_per_group: int) -> bool:
    """Can group-limited routing run with `kept_per_group` experts in every group? Sigmoid
    (DeepSeek-V3-style) routers score a group by its top-2 experts, so they need 2."""
    topk_group = int(first_value(layout.config, layout.family.keys.topk_group, 1) or 1)
    need = 2 if layout.family.router.scoring == "sigmoid" else 1
    return kept_per_group >= need and topk_group * kept_per_group >= layout.top_k()


def grouping_changes(layout: ModelLayout, layers: list[LayerPlan]) -> tuple[dict[str, int],
                                                                              list[str]]:
    """Config keys to rewrite so grouped routing stays valid, and the warning saying why.

    Groups survive when every group of every layer keeps the same number of experts (and enough
    of them); otherwise the router falls back to n_group = topk_group = 1 (plain top-k)."""
    groups = group_count(layout)
    if groups <= 1 or all(not p.dropped for p in layers):
        return {}, []
    size = layers[0].num_experts // groups
    counts = {sum(1 for j in p.kept if j // size == g) for p in layers for g in range(groups)}
    if layers[0].num_experts % groups == 0 and len(counts) == 1 and group_feasible(
            layout, counts.pop()):
        return {}, []
    topk_group = first_value(layout.config, layout.family.keys.topk_group, 1)
    n_drop = layers[0].num_experts - len(layers[0].kept)
    why = (f"{n_drop} is not a multiple of n_group={groups}" if n_drop % groups else
           "the kept experts are not spread equally over the groups, or too few remain per group")
    return {"n_group": 1, "topk_group": 1}, [
        f"{GROUPING} (n_group={groups}, topk_group={topk_group}) cannot stay valid after "
        f"removing {n_drop} of {layers[0].num_experts} experts per layer ({why}); the pruned "
        "config sets n_group=1, topk_group=1: plain top-k over all remaining experts"]


# -- validation of a plan against a model ------------------------------------------------------

def validate_plan(plan: PrunePlan, layout: ModelLayout, fingerprint: str,
                  ignore_fingerprint: bool = False) -> PrunePlan:
    """Check a (loaded) plan against the model and return it with its grouping re-derived."""
    model_layers = {layer.index: layer for layer in layout.moe_layers}
    planned = [p.layer for p in plan.layers]
    for index in planned:
        if index not in model_layers:
            raise InvalidArgumentError(f"plan names layer {index}, which is not a MoE layer of "
                                       f"this model (MoE layers: {sorted(model_layers)})")
    twice = sorted({index for index in planned if planned.count(index) > 1})
    if twice:
        raise InvalidArgumentError(f"plan lists layer {', '.join(map(str, twice))} twice",
                                   "give each MoE layer one entry")
    missing = sorted(set(model_layers) - set(planned))
    if missing:
        raise InvalidArgumentError(f"plan must list every MoE layer once; missing {missing}")
    for p in plan.layers:
        _check_layer(p, model_layers[p.layer].num_experts)
        hit = sorted(set(plan.protected.get(p.layer, ())) & set(p.dropped))
        if hit:
            raise InvalidArgumentError(f"plan drops protected expert(s) {hit} in layer {p.layer}")
    counts = {len(p.kept) for p in plan.layers}
    if len(counts) != 1:
        raise InvalidArgumentError(f"plan keeps {sorted(counts)} experts in different layers",
                                   "stock runtimes need one expert count per model")
    num_experts = plan.layers[0].num_experts
    check_remaining(counts.pop(), num_experts, layout.top_k(), plan.min_experts, "in the plan")
    if not ignore_fingerprint and plan.model_fingerprint != fingerprint:
        raise InvalidArgumentError(
            f"plan was made for model {plan.model_fingerprint}, not this checkpoint "
            f"({fingerprint})", "pass --ignore-fingerprint to apply it anyway")
    plan.config_changes, grouping = grouping_changes(layout, plan.layers)
    plan.warnings = [w for w in plan.warnings if not w.startswith(GROUPING)] + grouping
    if plan.model_fingerprint != fingerprint:  # let through by ignore_fingerprint: say so
        note = (f"plan was made for model {plan.model_fingerprint}, not this checkpoint "
                f"({fingerprint}): applied anyway (--ignore-fingerprint)")
        plan.warnings += [note] if note not in plan.warnings else []
    return plan


def _check_layer(p: LayerPlan, num_experts: int) -> None:
    if p.num_experts != num_experts:
        raise InvalidArgumentError(f"plan says layer {p.layer} has {p.num_experts} experts; the "
                                   f"model has {num_experts}")
    for j in p.kept + p.dropped:
        if not 0 <= j < num_experts:
            raise InvalidArgumentError(
                f"plan names expert {j} in layer {p.layer}, which has only {num_experts} "
                f"experts (ids 0-{num_experts - 1})")
    if sorted(p.kept + p.dropped) != list(range(num_experts)) or p.kept != sorted(p.kept):
        raise InvalidArgumentError(f"plan layer {p.layer}: kept {p.kept} and dropped "
                                   f"{p.dropped} must be sorted and split ids 0-"
                                   f"{num_experts - 1} exactly once")


# -- what a plan costs (layer-wise budget report) ---------------------------------------------

def budget_rows(plan: PrunePlan, stats: ExpertStats | None) -> list[dict[str, Any]]:
    """Per MoE layer: experts kept/removed, and the share removed of routing traffic (tokens),
    routing weight (weight_sum) and saliency (the criterion's values; REAP for random and
    explicit plans). Shares are in [0, 1]; NaN without statistics."""
    rows = []
    for p in plan.layers:
        row: dict[str, Any] = {"layer": p.layer, "experts": p.num_experts, "kept": len(p.kept),
                               "removed": len(p.dropped),
                               "removed_ids": " ".join(map(str, p.dropped))}
        saliency = p.scores if plan.criterion not in ("random", "explicit") else None
        if stats is not None and p.layer in stats.values and saliency is None:
            tokens, reap = stats.column(p.layer, "tokens"), stats.column(p.layer, "reap_sum")
            saliency = [r / t if t > 0 else 0.0 for r, t in zip(reap, tokens, strict=True)]
        for name, column in (("traffic_removed", "tokens"), ("weight_removed", "weight_sum")):
            values = stats.column(p.layer, column) if stats and p.layer in stats.values else None
            row[name] = _share(values, p.dropped) if values is not None else \
                p.removed_shares.get(name, math.nan)
        row["saliency_removed"] = _share(saliency, p.dropped)
        rows.append(row)
    return rows


def _share(values: list[float] | tuple[float, ...] | None, dropped: list[int]) -> float:
    if values is None:
        return math.nan
    total = sum(values)
    return sum(values[j] for j in dropped) / total if total > 0 else 0.0
