"""Expert importance criteria over routing statistics, and super experts.

`criterion_scores` gives one value per expert of a layer (higher = more important) from an
`ExpertStats` table (`moekit profile` output); `super_experts` finds the experts with an
outstanding largest output norm. Plain Python: planning from statistics never imports numpy.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from moekit.errors import InvalidArgumentError, StatsError

if TYPE_CHECKING:
    from moekit.stats.expert_stats import ExpertStats


CRITERIA: dict[str, str] = {
    "reap": "REAP saliency: reap_sum / tokens, the mean over routed tokens of gate weight x "
            "||expert output|| (0 for experts no token reached)",
    "reap-sum": "reap_sum: the sum over routed tokens of gate weight x ||expert output||",
    "frequency": "tokens: how many tokens were routed to the expert",
    "weight": "weight_sum: the sum of the expert's gate weights",
    "ean": "ean_sum: the sum over routed tokens of ||expert output||",
    "man": "ean_sum / tokens: the mean ||expert output|| over routed tokens (MAN; 0 for experts "
           "no token reached)",
    "ablation": "ablation_loss: the mean loss change (nats/token) when the expert is removed "
                "from its layer's routing, measured by `moekit profile --ablation`",
    "ablation-kl": "ablation_kl: the mean KL(unablated || ablated) when the expert is removed "
                   "(`moekit profile --ablation`)",
    "ablation-fo": "ablation_loss_fo: the first-order estimate of ablation_loss "
                   "(`moekit profile --ablation --ablation-method first-order|both`)",
    "random": "uniform random scores (seeded with --seed): the baseline",
}


DEFAULT_CRITERION = "ean"  # evidence: docs/benchmarks.md (prune quality across families)


_COLUMN = {"frequency": "tokens", "weight": "weight_sum", "ean": "ean_sum", "reap-sum": "reap_sum",
           "ablation": "ablation_loss", "ablation-kl": "ablation_kl",
           "ablation-fo": "ablation_loss_fo"}


def criterion_scores(criterion: str, stats: ExpertStats | None, layer: int, num_experts: int,
                     rng: random.Random) -> list[float]:
    """The criterion's value for every expert of `layer` (higher = more important)."""
    if criterion == "random":
        return [rng.random() for _ in range(num_experts)]
    if criterion not in CRITERIA:
        raise InvalidArgumentError(f"unknown --criterion '{criterion}'",
                                   f"use one of {', '.join(CRITERIA)}")
    if stats is None:
        raise StatsError(f"--criterion {criterion} needs routing statistics",
                         "pass --stats DIR from `moekit profile`, or use --criterion random")
    if criterion.startswith("ablation"):
        _check_ablation(stats, layer, _COLUMN[criterion], criterion)
    if criterion in ("reap", "man"):
        tokens = stats.column(layer, "tokens")
        sums = stats.column(layer, "reap_sum" if criterion == "reap" else "ean_sum")
        return [r / t if t > 0 else 0.0 for r, t in zip(sums, tokens, strict=True)]
    return list(stats.column(layer, _COLUMN[criterion]))


def _check_ablation(stats: ExpertStats, layer: int, column: str, criterion: str) -> None:
    """The statistics hold measured `column` values for `layer` (else one-line StatsError)."""
    values = stats.values.get(layer, {})
    if column not in values or not any(values.get("ablation_tokens", ())) or all(
            v != v for v in values[column]):  # all NaN: e.g. KL of a first-order-only run
        what = "have no ablation columns" if "ablation_tokens" not in values else \
            f"have no {column} values for domain '{stats.domain}', layer {layer}"
        measured = "ablation_tokens" in values  # ablated, by another method
        how = "--ablation --ablation-method exact" if measured else "--ablation"
        first_order = any(v == v for v in values.get(_COLUMN["ablation-fo"], ()))
        other = (", or use --criterion ablation-fo (the first-order estimate these stats hold)"
                 if first_order and criterion != "ablation-fo" else "")
        raise StatsError(f"--criterion {criterion}: the stats in {stats.folder} {what}",
                         f"re-run `moekit profile MODEL {how} --out DIR` and pass --stats DIR"
                         f"{other}")


SUPER_PERCENTILE, SUPER_FRACTION, SUPER_LAYERS = 99.5, 0.1, 0.75


def super_experts(stats: ExpertStats) -> dict[int, list[int]]:
    """Experts with an outstanding `max_norm` (largest ||f|| seen), after Su et al. 2025
    ("super experts"): in the first 75% of MoE layers, max_norm above both the 99.5th
    percentile of all those experts' max_norm and a tenth of the largest one."""
    layers = stats.layers[:max(1, int(len(stats.layers) * SUPER_LAYERS))]
    values = {layer: stats.column(layer, "max_norm") for layer in layers}
    flat = [float(v) for vals in values.values() for v in vals]
    if not flat or any(v != v for v in flat):  # a NaN: no bar can be drawn (as numpy's NaN did)
        return {}
    flat.sort()
    if flat[-1] <= 0:
        return {}
    bar = max(percentile(flat, SUPER_PERCENTILE), SUPER_FRACTION * flat[-1])
    found = {layer: [e for e, v in enumerate(vals) if v > bar] for layer, vals in values.items()}
    return {layer: ids for layer, ids in found.items() if ids}


def percentile(ordered: list[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, linear between the two nearest ranks
    (numpy's default): position p = q/100 * (n - 1), value x[floor p] + frac(p) * (x[ceil p] -
    x[floor p]). Plain Python, so that planning a prune never imports numpy."""
    position = q / 100.0 * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def usage_criterion(criterion: str | None, notes: list[str]) -> str:
    """The criterion for a usage-only profile (`stats import`: routed counts, no output norms):
    `frequency` when none was asked (with a note), else refused unless it is `frequency`."""
    if criterion is None:
        notes.append("the statistics are usage counts only (imported from a serving engine): "
                     "criterion frequency")
        return "frequency"
    if criterion not in ("frequency", "random"):
        raise StatsError(f"--criterion {criterion} needs expert output norms, which a profile "
                         "imported from a serving engine does not have",
                         "use --criterion frequency, or profile the model with moekit profile")
    return criterion
