"""Merging one cluster of experts into one expert, and the merged router rows.

Average (weights w_j = p_j / sum p, p = usage), anchored on the centre c so that identical or
aligned copies give the centre bit-exactly:
    W_m = W_c + sum_{j != c} w_j (W_j - W_c)   (= sum_j w_j W_j)
for every weight and bias. `aligned` first permutes each member's neurons onto the centre's
(`align.py`). `fit` keeps the aligned average's gate/up and re-fits down (and its bias) by ridge
least squares on calibration tokens t that the original router sent to any member:
    a_t = sum_{j in C} g_tj,   y_t = sum_{j in C} g_tj f_j(x_t) / a_t,
    h_t = act(gate_m x_t, up_m x_t),
    [D | b] = argmin sum_t a_t ||D h_t + b - y_t||^2 + lam ||[D | b] - [D_0 | b_0]||^2,
with lam = ridge * trace(H^T A H) / I (ridge towards the averaged down projection D_0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from moekit.ops.merge.align import align_cluster
from moekit.surgery.experts import ROLES, Experts, expert_output, hidden

if TYPE_CHECKING:
    import torch

DEFAULT_RIDGE = 1e-2
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
Act = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def normalised(weights: list[float]) -> list[float]:
    """Weights scaled to sum 1 (uniform when they sum to 0)."""
    total = sum(weights)
    return [w / total for w in weights] if total > 0 else [1.0 / len(weights)] * len(weights)


def average(members: Experts, weights: list[float]) -> Experts:
    """One expert (leading axis 1): the centre-anchored weighted average of the members."""
    w = normalised(weights)
    out = []
    for role in ROLES:
        stack = getattr(members, role)
        if stack is None:
            out.append(None)
            continue
        merged = stack[0].clone()
        for j in range(1, stack.shape[0]):
            if w[j]:
                merged += w[j] * (stack[j] - stack[0])
        out.append(merged.unsqueeze(0))
    return Experts(*out)


def merge_cluster(members: Experts, weights: list[float], method: str) -> Experts:
    """Merge `members` (centre first) by `method`: average, aligned (also the start of `fit`),
    or the centre itself (the start of `fit-centre` and `fit-layer`); `fit.py` / `refit.py`
    then re-fit the down projections."""
    if members.num_experts == 1:
        return members
    if method in ("fit-centre", "fit-layer"):
        return members.select([0])
    if method in ("aligned", "fit"):
        members = align_cluster(members)
    return average(members, weights)


def cluster_target(members: Experts, inputs: torch.Tensor, gates: torch.Tensor,
                   act: Act) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, H], a [n], y [n, H]) on the n tokens routed to any member: the members' summed
    gate weight a_t and their gate-weighted mean output y_t."""
    import torch

    a = gates.sum(dim=1)
    keep = a > 0
    x, g, a = inputs[keep], gates[keep], a[keep]
    y = torch.zeros_like(x)
    for j in range(members.num_experts):
        routed = g[:, j] > 0
        if routed.any():
            y[routed] += g[routed, j:j + 1] * expert_output(members, j, x[routed], act)
    return x, a, y / a.clamp_min(1e-12).unsqueeze(1)


def fit_down(merged: Experts, members: Experts, inputs: torch.Tensor, gates: torch.Tensor,
             act: Act, ridge: float = DEFAULT_RIDGE) -> Experts:
    """`merged` with down (and down bias) re-fitted to the cluster's gate-weighted output y_t,
    token weights a_t (module doc)."""
    x, a, y = cluster_target(members, inputs.float(), gates.float(), act)
    return ridge_down(merged, x, y, a, act, ridge)


def ridge_down(merged: Experts, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
               act: Act, ridge: float | None = DEFAULT_RIDGE) -> Experts:
    """Re-fit down [H, I] (and bias [H]) of a one-expert `merged` so that f(x_t) ~ target_t:
    argmin sum_t weight_t ||D h_t + b - target_t||^2 + lam ||[D | b] - [D_0 | b_0]||^2,
    lam = ridge * mean diag(H^T W H). `ridge=None` picks it from RIDGE_GRID (or keeps D_0) by
    the weighted error on every fifth token held out, then refits on all tokens."""
    import torch

    if x.shape[0] == 0:
        return merged
    h = hidden(merged, 0, x, act).double()
    bias = merged.down_bias is not None
    if bias:
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)
    start = merged.down[0].T.double()  # [I, H]
    if bias:
        start = torch.cat([start, merged.down_bias.double()], dim=0)  # type: ignore[union-attr]
    if ridge is None:
        ridge = _choose_ridge(h, target.double(), weight.double(), start)
        if ridge is None:
            return merged
    solution = _solve(h, target.double(), weight.double(), start, ridge)
    width = merged.down.shape[2]
    down = solution[:width].T.float().unsqueeze(0).contiguous()
    down_bias = solution[width:].float() if bias else None
    return Experts(merged.gate, merged.up, down, merged.gate_bias, merged.up_bias, down_bias)


def _solve(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, start: torch.Tensor,
           ridge: float) -> torch.Tensor:
    import torch

    weighted = h * w.unsqueeze(1)
    gram, rhs = h.T @ weighted, weighted.T @ y
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, rhs + lam * start)


def _choose_ridge(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                  start: torch.Tensor) -> float | None:
    """The RIDGE_GRID value with the lowest held-out error (None: the start is best)."""
    import torch

    held = torch.zeros(h.shape[0], dtype=torch.bool)
    held[4::5] = True
    if int(held.sum()) < 8:
        return DEFAULT_RIDGE

    def error(solution: torch.Tensor) -> float:
        diff = h[held] @ solution - y[held]
        return float((w[held] * diff.pow(2).sum(dim=1)).sum())

    best, best_error = None, error(start)
    for ridge in RIDGE_GRID:
        value = error(_solve(h[~held], y[~held], w[~held], start, ridge))
        if value < best_error:
            best, best_error = ridge, value
    return best


def reconstruction_error(merged: Experts, members: Experts, inputs: torch.Tensor,
                         gates: torch.Tensor, act: Act) -> float:
    """sum_t a_t ||f_m(x_t) - y_t||^2 / sum_t a_t ||y_t||^2 on the tokens routed to the cluster
    (relative, gate-weighted)."""
    x, a, y = cluster_target(members, inputs.float(), gates.float(), act)
    if x.shape[0] == 0:
        return 0.0
    diff = ((expert_output(merged, 0, x, act) - y) ** 2).sum(dim=1)
    return float((a * diff).sum() / (a * (y ** 2).sum(dim=1)).sum().clamp_min(1e-30))


def merge_rows(values: torch.Tensor, clusters: list[list[int]], weights: list[list[float]],
               axis: int = 0) -> torch.Tensor:
    """Router rows (or bias entries) of the merged experts: row i = sum_j w_ij values[j] along
    `axis` (float32; the caller casts back)."""
    import torch

    values = values.float().movedim(axis, 0)
    rows = []
    for members, w in zip(clusters, weights, strict=True):
        w = normalised(w)
        rows.append(sum((wj * values[j] for j, wj in zip(members, w, strict=True)),
                        torch.zeros_like(values[0])))
    return torch.stack(rows).movedim(0, axis).contiguous()
