"""Router initialisation and neuron clustering for `moekit upcycle`.

Router weights W_r [E, H]; logits z = W_r x on the FFN input x (post-attention norm).

- random: W_r ~ N(0, std^2), seeded per layer (std 0.02 as Sparse Upcycling / Drop-Upcycling).
- zero: W_r = 0, so softmax gives 1/E to every expert (function-preserving splits).
- data (copy, drop): spherical k-means (k-means++ seeding, Lloyd iterations with balanced
  assignment) of the captured FFN inputs, centred on their mean, into E clusters; row e = unit
  centroid e made orthogonal to the mean input, times s, with s chosen so that the per-token
  centred logits have std 1 on the calibration tokens. Tokens go to the experts of their
  nearest centroids (top-k of c_e . (x - mean) ranks like top-k of cos(c_e, x - mean)).
- data (split): least-squares router predicting each expert's activation mass
  m_e(t) = sum_{n in S_e} |silu(g_n . x) (u_n . x)|, standardised per token, so top-k picks the
  experts whose neurons fire most for the token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moekit.errors import DataError
from moekit.ops.upcycle.experts import generator, seed_of

if TYPE_CHECKING:
    import numpy as np
    import torch

KMEANS_ITERS = 15
RIDGE = 1e-3


def random_router(seed: int, layer: int, experts: int, hidden: int, std: float) -> np.ndarray:
    """[E, H] float32 ~ N(0, std^2), the same for a given (seed, layer) (numpy PCG64, so a
    plain copy-upcycle needs no torch)."""
    import numpy as np

    rng = np.random.default_rng(seed_of(seed, layer, "router"))
    return rng.standard_normal((experts, hidden), dtype=np.float32) * np.float32(std)


def balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Labels [N] maximising similarity greedily with at most `capacity` points per cluster:
    each round every free point bids for its best open cluster and each cluster keeps its
    most similar bidders. sim: [N, k]."""
    import torch

    sim = sim.clone()
    labels = torch.full((sim.shape[0],), -1, dtype=torch.long)
    room = torch.full((sim.shape[1],), capacity, dtype=torch.long)
    while bool((labels < 0).any()):
        free = (labels < 0).nonzero().squeeze(1)
        best = sim[free].argmax(dim=1)
        for cluster in best.unique().tolist():
            bidders = free[best == cluster]
            order = sim[bidders, cluster].argsort(descending=True)
            take = bidders[order[:int(room[cluster])]]
            labels[take] = cluster
            room[cluster] -= len(take)
            if room[cluster] == 0:
                sim[:, cluster] = float("-inf")
    return labels


def spherical_kmeans(points: torch.Tensor, k: int, gen: torch.Generator,
                     iters: int = KMEANS_ITERS, balanced: bool = True) -> torch.Tensor:
    """Unit centroids [k, D] of the L2-normalised rows of `points` [N, D] under cosine
    similarity. Seeding: k-means++ (next centre drawn with p ~ (1 - max cos)^2). Balanced:
    every cluster holds at most ceil(N / k) points in each assignment step."""
    import torch

    unit = torch.nn.functional.normalize(points.float(), dim=1)
    n = unit.shape[0]
    centres = [unit[int(torch.randint(n, (1,), generator=gen))]]
    for _ in range(1, k):
        dist = (1 - (unit @ torch.stack(centres).T).max(dim=1).values).clamp_min(0) ** 2
        weights = dist if float(dist.sum()) > 0 else torch.ones(n)
        centres.append(unit[int(torch.multinomial(weights, 1, generator=gen))])
    centroids = torch.stack(centres)
    capacity = -(-n // k)
    for _ in range(iters):
        sim = unit @ centroids.T
        labels = balanced_assign(sim, capacity) if balanced else sim.argmax(dim=1)
        onehot = torch.nn.functional.one_hot(labels, k).to(unit.dtype)
        sums = onehot.T @ unit
        empty = sums.norm(dim=1) == 0
        sums[empty] = centroids[empty]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def unit_logit_scale(rows: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """`rows` rescaled so the logits inputs @ rows.T, centred over experts per token, have std 1."""
    logits = inputs @ rows.T
    spread = (logits - logits.mean(dim=1, keepdim=True)).std()
    return rows / spread.clamp_min(1e-12)


def kmeans_router(inputs: torch.Tensor, experts: int, seed: int, layer: int) -> torch.Tensor:
    """[E, H] float32 router from spherical k-means of the centred FFN inputs [T, H].

    The router has no bias, so rows are made orthogonal to the mean input mu: then
    c_e . x = c_e . (x - mu) and top-k ranks experts by the centred input alone (the
    direction every token shares would otherwise favour the experts aligned with it)."""
    import torch

    if inputs.shape[0] < experts:
        raise DataError(f"{inputs.shape[0]} calibration tokens cannot seed {experts} clusters",
                        "give more --data or a larger --max-tokens")
    mean = inputs.mean(dim=0)
    centroids = spherical_kmeans(inputs - mean, experts, generator(seed, layer, "kmeans"))
    direction = torch.nn.functional.normalize(mean, dim=0)
    rows = centroids - (centroids @ direction)[:, None] * direction
    return unit_logit_scale(torch.nn.functional.normalize(rows, dim=1), inputs)


def neuron_activations(inputs: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
                       ) -> torch.Tensor:
    """|silu(x W_gate^T) * (x W_up^T)|: [T, I] activation magnitudes of every neuron."""
    import torch

    act = torch.nn.functional.silu(inputs @ gate.float().T) * (inputs @ up.float().T)
    return act.abs()


def cluster_neurons(activations: torch.Tensor, experts: int, shared: int, seed: int,
                    layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups [E, (I-N)/E], shared [N]) from calibration activations [T, I]: the shared
    expert takes the N neurons with the largest mean |activation|; the rest are grouped by
    balanced spherical k-means of their activation profiles (co-activation), equal sizes."""
    import torch

    order = activations.mean(dim=0).argsort(descending=True)
    shared_ids, rest = order[:shared].sort().values, order[shared:]
    width = len(rest) // experts
    profiles = activations[:, rest].T
    centroids = spherical_kmeans(profiles, experts, generator(seed, layer, "neurons"))
    unit = torch.nn.functional.normalize(profiles, dim=1)
    labels = balanced_assign(unit @ centroids.T, width)
    groups = torch.stack([rest[labels == e].sort().values for e in range(experts)])
    return groups, shared_ids


def mass_router(inputs: torch.Tensor, activations: torch.Tensor,
                groups: torch.Tensor) -> torch.Tensor:
    """[E, H] least-squares router whose logits predict each expert's standardised
    activation mass: W = argmin |X W^T - M|^2 + ridge |W|^2."""
    import torch

    mass = torch.stack([activations[:, g].sum(dim=1) for g in groups], dim=1)
    mass = mass - mass.mean(dim=1, keepdim=True)
    mass = mass / mass.std().clamp_min(1e-12)
    gram = inputs.T @ inputs
    ridge = RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0])
    return torch.linalg.solve(gram + ridge, inputs.T @ mass).T.contiguous()
