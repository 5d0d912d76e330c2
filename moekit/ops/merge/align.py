"""Neuron permutation alignment of SwiGLU experts (weight matching).

The intermediate neurons of an expert can be permuted without changing its function: neuron a is
row a of gate and up (and of their biases) and column a of down. Before averaging expert j into
the centre c, find the permutation P maximising the summed inner products of matched neurons,
    P* = argmax_P  sum_a <gate_c[a], gate_j[P a]> + <up_c[a], up_j[P a]>
                         + <down_c[:, a], down_j[:, P a]> (+ bias products),
a linear assignment problem on the [I, I] score matrix (scipy's `linear_sum_assignment`). For
j a permuted copy of c, sum_a ||w_c[a] - w_j[P a]||^2 = 2 sum ||w||^2 - 2 score(P), so the true
permutation is the maximiser and the aligned copy equals c exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moekit.surgery.experts import Experts

if TYPE_CHECKING:
    import torch


def neuron_scores(experts: Experts, c: int, j: int) -> torch.Tensor:
    """[I, I] float64: score[a, b] = similarity of neuron a of expert c and neuron b of j
    (float32 products of the two experts only, summed in float64)."""
    g, u, d = experts.gate, experts.up, experts.down
    score = (g[c] @ g[j].T).double() + (u[c] @ u[j].T).double() + (d[c].T @ d[j]).double()
    for bias in (experts.gate_bias, experts.up_bias):
        if bias is not None:
            score = score + bias[c].double().unsqueeze(1) * bias[j].double().unsqueeze(0)
    return score


def match_neurons(experts: Experts, c: int, j: int) -> torch.Tensor:
    """perm [I] (long): neuron perm[a] of expert j is matched to neuron a of expert c."""
    import torch
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(neuron_scores(experts, c, j).numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def permute_expert(experts: Experts, j: int, perm: torch.Tensor) -> None:
    """Reorder expert j's intermediate neurons in place (its function is unchanged)."""
    experts.gate[j] = experts.gate[j][perm]
    experts.up[j] = experts.up[j][perm]
    experts.down[j] = experts.down[j][:, perm]
    for bias in (experts.gate_bias, experts.up_bias):
        if bias is not None:
            bias[j] = bias[j][perm]


def align_cluster(experts: Experts) -> Experts:
    """Align every member (index >= 1) of a cluster to its centre (index 0), in place."""
    for j in range(1, experts.num_experts):
        permute_expert(experts, j, match_neurons(experts, 0, j))
    return experts
