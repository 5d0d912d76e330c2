"""Grouping experts into clusters per MoE layer, and the merge plan built from them.

Per layer with E experts, n = floor(ratio * E + 0.5) are folded away, leaving E' = E - n
clusters in every layer. Distances between experts (E x E):
- `weight`:  1 - cos(theta_i, theta_j), theta = all of an expert's weights flattened;
- `hc-smoe`: ||c_i - c_j||_2 with c_j = mean_t f_j(x_t) over calibration tokens (every expert
  run on every token);
- `m-smoe`:  1 - cos(z_i, z_j), z_j = router-logit column of expert j over calibration tokens.
`weight` and `hc-smoe` cluster by agglomerative average linkage (merge the two clusters of least
mean pairwise distance until E' remain); the centre of a cluster is its member with the highest
--criterion score. `m-smoe` takes the E' highest-scoring experts as centres (dominants) and sends
every other expert to its nearest centre. Group-limited routing (n_group = G): clustering runs
inside each group with E'/G clusters per group when that keeps the router valid. Protected
experts (super experts by default, as `prune` keeps them) stay singleton clusters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from moekit.errors import InvalidArgumentError
from moekit.ops.merge.combine import normalised
from moekit.ops.merge.plan import MergeLayer, MergePlan, check_choices
from moekit.stats.criteria import criterion_scores
from moekit.surgery.plan import check_remaining, drop_count, group_count, group_feasible

if TYPE_CHECKING:
    import torch

    from moekit.families.layout import ModelLayout, MoeLayer
    from moekit.stats.expert_stats import ExpertStats

DistanceFn = Callable[[int], "torch.Tensor"]


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """[E, P] -> [E, E] 1 - cosine similarity of the rows (float64)."""
    x = features.double()
    return gram_cosine_distance(x @ x.T)


def gram_cosine_distance(gram: torch.Tensor) -> torch.Tensor:
    """[E, E] inner products -> 1 - cosine similarity."""
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    return (1.0 - gram / norms.unsqueeze(0) / norms.unsqueeze(1)).clamp_min(0.0)


def euclidean_distance(features: torch.Tensor) -> torch.Tensor:
    """[E, P] -> [E, E] Euclidean distances of the rows (float64)."""
    import torch

    x = features.double()
    return torch.cdist(x, x)


def spans(layout: ModelLayout, num: int, n_drop: int) -> list[list[int]]:
    """Expert id ranges clustered separately: the routing groups when the router is group-
    limited and every group can give up n_drop / G experts and stay valid, else all ids."""
    groups = group_count(layout)
    if groups > 1 and num % groups == 0 and n_drop % groups == 0:
        size = num // groups
        if group_feasible(layout, size - n_drop // groups):
            return [list(range(g * size, (g + 1) * size)) for g in range(groups)]
    return [list(range(num))]


def average_linkage(dist: torch.Tensor, ids: list[int], count: int) -> list[list[int]]:
    """Agglomerative clustering of `ids` into `count` clusters by average linkage on `dist`
    (ties: the pair with the lower ids first)."""
    clusters = [[j] for j in ids]
    while len(clusters) > count:
        best: tuple[float, int, int] | None = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = float(dist[clusters[a]][:, clusters[b]].mean())
                if best is None or d < best[0] - 1e-12:
                    best = (d, a, b)
        assert best is not None
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return clusters


def dominant_clusters(dist: torch.Tensor, ids: list[int], scores: list[float],
                      count: int) -> list[list[int]]:
    """The `count` highest-scoring ids are centres; every other id joins its nearest centre."""
    ranked = sorted(ids, key=lambda j: (-scores[j], j))
    centres = sorted(ranked[:count])
    clusters = {c: [c] for c in centres}
    for j in ranked[count:]:
        nearest = min(centres, key=lambda c: (float(dist[j, c]), c))
        clusters[nearest].append(j)
    return list(clusters.values())


def with_centre(cluster: list[int], scores: list[float]) -> list[int]:
    """The cluster with its highest-scoring member first, the rest ascending."""
    centre = min(cluster, key=lambda j: (-scores[j], j))
    return [centre, *sorted(j for j in cluster if j != centre)]


def layer_clusters(group: str, dist: torch.Tensor, scores: list[float],
                   id_spans: list[list[int]], n_drop: int,
                   protect: Collection[int] = ()) -> list[list[int]]:
    """Clusters (centre first) ordered by centre id, n_drop fewer than experts. Protected ids
    stay singletons (never folded, nothing folded into them) while the span has room for more
    clusters than protected ids; else they are forced to be centres."""
    clusters: list[list[int]] = []
    for ids in id_spans:
        count = len(ids) - n_drop // len(id_spans)
        fixed = [j for j in ids if j in protect]
        if len(fixed) >= count:
            boosted = [math.inf if j in protect else v for j, v in enumerate(scores)]
            clusters += [with_centre(c, boosted) for c in dominant_clusters(dist, ids, boosted,
                                                                            count)]
            continue
        rest = [j for j in ids if j not in protect]
        found = (dominant_clusters(dist, rest, scores, count - len(fixed)) if group == "m-smoe"
                 else average_linkage(dist, rest, count - len(fixed)))
        clusters += [[j] for j in fixed] + [with_centre(c, scores) for c in found]
    return sorted(clusters, key=lambda c: c[0])


class Grouper:
    """Clusters one MoE layer at a time, in layer order (the `random` criterion draws from one
    generator across layers): `layer(moe, distance)` -> MergeLayer, `plan(layers)` -> MergePlan.
    Merge weights are the usage shares (statistics' token counts). `protect[layer]`: experts
    kept out of every merge (e.g. super experts)."""

    def __init__(self, layout: ModelLayout, fingerprint: str, *, group: str, method: str,
                 router: str, ratio: float, stats: ExpertStats | None, criterion: str = "reap",
                 protect: dict[int, list[int]] | None = None):
        check_choices(group, method, router)
        check_ratio(layout, ratio)
        self.layout, self.fingerprint, self.stats = layout, fingerprint, stats
        self.group, self.method, self.router = group, method, router
        self.ratio, self.criterion, self.protect = ratio, criterion, protect or {}
        self.rng = random.Random(0)

    def n_drop(self, num_experts: int) -> int:
        return drop_count(self.ratio, num_experts)

    def layer(self, layer: MoeLayer, distance: DistanceFn) -> MergeLayer:
        """Layer `layer`'s clusters; `distance(layer)` [E, E] is only asked for when some
        expert is folded."""
        num = layer.num_experts
        n_drop = self.n_drop(num)
        scores = criterion_scores(self.criterion, self.stats, layer.index, num, self.rng)
        if n_drop == 0:
            clusters = [[j] for j in range(num)]
        else:
            clusters = layer_clusters(self.group, distance(layer.index), scores,
                                      spans(self.layout, num, n_drop), n_drop,
                                      self.protect.get(layer.index, ()))
        usage = (list(self.stats.column(layer.index, "tokens")) if self.stats is not None
                 else [1.0] * num)
        weights = [normalised([usage[j] for j in c]) for c in clusters]
        return MergeLayer(layer.index, num, clusters, weights)

    def plan(self, layers: list[MergeLayer], calibration: dict | None = None) -> MergePlan:
        stats = self.stats
        return MergePlan(group=self.group, method=self.method, router=self.router,
                         criterion=self.criterion, ratio=self.ratio,
                         family=self.layout.family.name, top_k=self.layout.top_k(),
                         model_fingerprint=self.fingerprint, layers=layers,
                         stats_sha256=stats.sha256 if stats else None,
                         calibration=calibration or {})


def build_merge_plan(layout: ModelLayout, fingerprint: str, distance: DistanceFn, *,
                     group: str, method: str, router: str, ratio: float,
                     stats: ExpertStats | None, criterion: str = "reap",
                     calibration: dict | None = None,
                     protect: dict[int, list[int]] | None = None) -> MergePlan:
    """Cluster every MoE layer (`Grouper`); `distance(layer)` gives the [E, E] expert
    distances of the chosen grouping."""
    grouper = Grouper(layout, fingerprint, group=group, method=method, router=router,
                      ratio=ratio, stats=stats, criterion=criterion, protect=protect)
    return grouper.plan([grouper.layer(layer, distance) for layer in layout.moe_layers],
                        calibration)


def check_ratio(layout: ModelLayout, ratio: float | None) -> None:
    """Refuse ratios outside [0, 1) or leaving fewer than top-k experts (before any work)."""
    if ratio is None:
        raise InvalidArgumentError("--ratio is required", "e.g. --ratio 0.25")
    if not 0.0 <= ratio < 1.0:
        raise InvalidArgumentError(f"--ratio {ratio} is outside [0, 1)",
                                   "give the share of routed experts to fold away, e.g. 0.25")
    for layer in layout.moe_layers:
        num, n_drop = layer.num_experts, drop_count(ratio, layer.num_experts)
        check_remaining(num - n_drop, num, layout.top_k(), None,
                        f"--ratio {ratio} folds {n_drop} of {num} away")
