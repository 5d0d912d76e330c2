"""Choosing the experts to drop: criteria over routing statistics, protection, explicit lists,
group-aware selection. Everything here reads headers and statistics only, never weights.

Per MoE layer with E experts, n = floor(ratio * E + 0.5) experts are removed in every layer
(stock runtimes need one expert count per model): the n unprotected experts with the lowest
criterion value (ties: lower id first). With group-limited routing (n_group = G > 1) and
n divisible by G, n / G experts are removed from each group so the config stays valid.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.errors import InvalidArgumentError
from moekit.stats.criteria import criterion_scores
from moekit.surgery.plan import (
    LayerPlan,
    PrunePlan,
    check_remaining,
    drop_count,
    group_count,
    group_feasible,
    grouping_changes,
)

if TYPE_CHECKING:
    from moekit.families.layout import ModelLayout
    from moekit.stats.expert_stats import ExpertStats


def merge_protect(*maps: dict[int, list[int]]) -> dict[int, list[int]]:
    """Union of several {layer: ids} maps."""
    out: dict[int, set[int]] = {}
    for mapping in maps:
        for layer, ids in mapping.items():
            out.setdefault(layer, set()).update(ids)
    return {layer: sorted(ids) for layer, ids in sorted(out.items())}


def parse_protect(values: list[str], layout: ModelLayout) -> dict[int, list[int]]:
    """`LAYER:EXPERT[,LAYER:EXPERT...]` (LAYER may be `*` for every MoE layer) -> ids per layer."""
    layers = {layer.index: layer.num_experts for layer in layout.moe_layers}
    protected: dict[int, set[int]] = {}
    for item in (x.strip() for value in values for x in value.split(",") if x.strip()):
        match = re.fullmatch(r"(\*|\d+):(\d+)", item)
        if not match:
            raise InvalidArgumentError(f"--protect item '{item}' is not LAYER:EXPERT",
                                       "e.g. --protect 3:17,5:2 or --protect '*:0'")
        targets = list(layers) if match[1] == "*" else [int(match[1])]
        for layer in targets:
            _check_ids(layers, layer, [int(match[2])], "--protect")
            protected.setdefault(layer, set()).add(int(match[2]))
    return {layer: sorted(ids) for layer, ids in sorted(protected.items())}


def read_expert_lists(path: Path, layout: ModelLayout, option: str) -> dict[int, list[int]]:
    """A `--keep`/`--drop` file: JSON `{"LAYER": [ids]}` or text lines `LAYER: id id ...`
    (`*` = every MoE layer; `#` starts a comment)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{option} file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _text_lists(text, path, option)
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{option} file {path} must map layers to expert ids",
                                   'e.g. {"3": [0, 5, 7]}')
    layers = {layer.index: layer.num_experts for layer in layout.moe_layers}
    lists: dict[int, list[int]] = {}
    for key, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise InvalidArgumentError(f"{option} file {path}: layer {key} must list integers")
        targets = list(layers) if str(key).strip() == "*" else [_layer_key(key, path, option)]
        for layer in targets:
            _check_ids(layers, layer, ids, f"{option} file {path.name}")
            lists[layer] = sorted(set(lists.get(layer, [])) | set(ids))
    return lists


def _text_lists(text: str, path: Path, option: str) -> dict[str, list[int]]:
    data: dict[str, list[int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        layer, sep, ids = line.partition(":")
        try:
            data[layer.strip()] = [int(x) for x in ids.replace(",", " ").split()]
        except ValueError as err:
            raise InvalidArgumentError(f"{option} file {path} line {number} is not "
                                       "'LAYER: id id ...' and the file is not JSON") from err
        if not sep:
            raise InvalidArgumentError(f"{option} file {path} line {number} has no ':'")
    return data


def _layer_key(key: str, path: Path, option: str) -> int:
    try:
        return int(key)
    except ValueError as err:
        raise InvalidArgumentError(f"{option} file {path}: '{key}' is not a layer index") from err


def _check_ids(layers: dict[int, int], layer: int, ids: list[int], what: str) -> None:
    if layer not in layers:
        raise InvalidArgumentError(f"{what} names layer {layer}, which is not a MoE layer "
                                   f"(MoE layers: {sorted(layers)})")
    bad = [j for j in ids if not 0 <= j < layers[layer]]
    if bad:
        raise InvalidArgumentError(f"{what} names expert {bad[0]} in layer {layer}, which has "
                                   f"only {layers[layer]} experts (ids 0-{layers[layer] - 1})")


def build_plan(layout: ModelLayout, fingerprint: str, *, criterion: str = "reap",
               ratio: float | None = None, stats: ExpertStats | None = None,
               keep: dict[int, list[int]] | None = None, drop: dict[int, list[int]] | None = None,
               protect: dict[int, list[int]] | None = None, min_experts: int | None = None,
               seed: int = 0) -> PrunePlan:
    """Decide which experts every MoE layer keeps. Raises before any weight is touched when the
    request cannot give a runnable model (ratio range, top-k, floor, protection, counts)."""
    protect = protect or {}
    if keep is not None or drop is not None:
        layers, ratio = _explicit(layout, keep, drop, ratio, protect, min_experts)
        criterion = "explicit"
    else:
        if ratio is None:
            raise InvalidArgumentError("--ratio is required", "e.g. --ratio 0.25")
        layers = _by_criterion(layout, criterion, ratio, stats, protect, min_experts, seed)
    counts = {len(p.kept) for p in layers}
    if len(counts) != 1:
        raise InvalidArgumentError(f"--ratio {ratio} keeps {sorted(counts)} experts in layers "
                                   "of different widths", "stock runtimes need one expert "
                                   "count per model: use --keep/--drop lists")
    plan = PrunePlan(criterion=criterion, ratio=ratio, family=layout.family.name,
                     top_k=layout.top_k(), model_fingerprint=fingerprint, layers=layers,
                     stats_sha256=stats.sha256 if stats else None,
                     domain=stats.domain if stats else None,
                     seed=seed if criterion == "random" else None, min_experts=min_experts,
                     protected=protect)
    plan.config_changes, plan.warnings = grouping_changes(layout, layers)
    if ratio > 0 and plan.num_dropped == 0:
        plan.warnings.append(f"--ratio {ratio} of {plan.num_experts} experts rounds to 0: "
                             "nothing is removed")
    return plan


def _by_criterion(layout: ModelLayout, criterion: str, ratio: float, stats: ExpertStats | None,
                  protect: dict[int, list[int]], min_experts: int | None,
                  seed: int) -> list[LayerPlan]:
    if not 0.0 <= ratio < 1.0:
        raise InvalidArgumentError(f"--ratio {ratio} is outside [0, 1)",
                                   "give the share of routed experts to remove, e.g. 0.25")
    rng = random.Random(seed)
    layers = []
    for layer in layout.moe_layers:
        num = layer.num_experts
        n_drop = drop_count(ratio, num)
        check_remaining(num - n_drop, num, layout.top_k(), min_experts,
                        f"--ratio {ratio} removes {n_drop} of {num}")
        guarded = set(protect.get(layer.index, ()))
        if len(guarded) > num - n_drop:
            raise InvalidArgumentError(f"layer {layer.index} protects {len(guarded)} experts but "
                                       f"only {num - n_drop} are kept", "lower --ratio")
        scores = criterion_scores(criterion, stats, layer.index, num, rng)
        dropped = _select(layout, scores, n_drop, guarded)
        kept = [j for j in range(num) if j not in dropped]
        layers.append(LayerPlan(layer.index, num, kept, sorted(dropped), scores))
    return layers


def _select(layout: ModelLayout, scores: list[float], n_drop: int, guarded: set[int]) -> set[int]:
    """The n_drop lowest-scoring unprotected experts; equally many per routing group when the
    router is group-limited and the groups can stay balanced."""
    num = len(scores)
    groups = group_count(layout)
    spans = [range(num)]
    if groups > 1 and n_drop % groups == 0 and num % groups == 0:
        size = num // groups
        per_group = [range(g * size, (g + 1) * size) for g in range(groups)]
        enough = all(len([j for j in g if j not in guarded]) >= n_drop // groups
                     for g in per_group)
        if enough and group_feasible(layout, size - n_drop // groups):
            spans = per_group
    dropped: set[int] = set()
    for span in spans:
        count = n_drop // len(spans)
        candidates = sorted((j for j in span if j not in guarded), key=lambda j: (scores[j], j))
        dropped.update(candidates[:count])
    return dropped


def _explicit(layout: ModelLayout, keep: dict[int, list[int]] | None,
              drop: dict[int, list[int]] | None, ratio: float | None,
              protect: dict[int, list[int]], min_experts: int | None
              ) -> tuple[list[LayerPlan], float]:
    if keep is not None and drop is not None:
        raise InvalidArgumentError("--keep and --drop both given", "give one of them")
    layers = []
    for layer in layout.moe_layers:
        num = layer.num_experts
        if keep is not None:
            if layer.index not in keep:
                raise InvalidArgumentError(f"--keep lists no experts for MoE layer "
                                           f"{layer.index}", 'list every layer, or use "*"')
            kept = keep[layer.index]
        else:
            kept = [j for j in range(num) if j not in (drop or {}).get(layer.index, [])]
        dropped = [j for j in range(num) if j not in kept]
        hit = sorted(set(protect.get(layer.index, ())) & set(dropped))
        if hit:
            raise InvalidArgumentError(f"layer {layer.index}: expert(s) {hit} are both "
                                       "protected and dropped")
        layers.append(LayerPlan(layer.index, num, sorted(kept), dropped))
    counts = {len(p.kept) for p in layers}
    if len(counts) != 1:
        per_layer = ", ".join(f"layer {p.layer}: {len(p.kept)}" for p in layers)
        raise InvalidArgumentError(f"the lists keep different expert counts per layer "
                                   f"({per_layer})", "stock runtimes need one expert count per "
                                   "model: remove the same number in every layer")
    num = layers[0].num_experts
    remaining = counts.pop()
    check_remaining(remaining, num, layout.top_k(), min_experts, "with the given lists")
    if ratio is not None and drop_count(ratio, num) != num - remaining:
        raise InvalidArgumentError(f"--ratio {ratio} removes {drop_count(ratio, num)} experts "
                                   f"per layer but the lists remove {num - remaining}",
                                   "leave out --ratio with --keep/--drop")
    return layers, (num - remaining) / num
