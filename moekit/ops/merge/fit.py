"""Output fitting of a whole merged layer under the merged router (`--method fit`).

On N calibration tokens x_t of layer l, the original layer's routed output is
    Y_t = sum_{j in topk(t)} g_tj f_j(x_t)                       (original router, E experts).
The merged router (centre rows, or usage-weighted rows: logits z' = z M with M [E, E'] the
router policy's weights) picks k of the E' merged experts with weights g'_ti. Start from the
aligned averages f_i^0 and their merged output P_t = sum_{i in topk'(t)} g'_ti f_i^0(x_t). For
every merged cluster i, its down projection (and bias) is re-fitted by ridge least squares so
that its contribution closes the gap left on the tokens routed to it:
    g'_ti f_i(x_t) ~ r_ti = Y_t - P_t + g'_ti f_i^0(x_t),
i.e. f_i(x_t) ~ r_ti / g'_ti with weight g'_ti^2 (`combine.ridge_down`, ridge towards f_i^0's
down projection). Singleton clusters are left as they are (byte copies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moekit.calib.routing import Routing, route
from moekit.ops.merge.combine import DEFAULT_RIDGE, Act, normalised, ridge_down
from moekit.surgery.experts import Experts, expert_output, stack

if TYPE_CHECKING:
    import torch

    from moekit.families.layout import ModelLayout
    from moekit.ops.merge.calib import LayerCalib
    from moekit.ops.merge.plan import MergeLayer


def router_matrix(plan_layer: MergeLayer, router: str) -> torch.Tensor:
    """M [E, E']: merged logit i = sum_j M[j, i] z_j (centre: one-hot; usage: the weights)."""
    import torch

    matrix = torch.zeros(plan_layer.num_experts, len(plan_layer.clusters))
    for i, (cluster, weights) in enumerate(zip(plan_layer.clusters, plan_layer.weights,
                                               strict=True)):
        shares = [1.0] + [0.0] * (len(cluster) - 1) if router == "centre" else normalised(weights)
        for j, w in zip(cluster, shares, strict=True):
            matrix[j, i] = w
    return matrix


def routed_output(experts: Experts, ids: torch.Tensor, weights: torch.Tensor,
                  x: torch.Tensor, act: Act) -> torch.Tensor:
    """sum_s weights[t, s] f_{ids[t, s]}(x_t) -> [N, H] (each expert run on its tokens only)."""
    import torch

    out = torch.zeros_like(x)
    for j in ids.unique().tolist():
        rows, slots = (ids == j).nonzero(as_tuple=True)
        out.index_add_(0, rows, weights[rows, slots].unsqueeze(1)
                       * expert_output(experts, j, x[rows], act))
    return out


def fit_router(weight: torch.Tensor, bias: torch.Tensor | None, plan_layer: MergeLayer,
               calib: LayerCalib, ridge: float = DEFAULT_RIDGE
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Router rows [E', H] (and bias [E']) for `--router fit`: a merged cluster's row is fitted
    by ridge least squares (towards the centre's row) to the log-sum-exp of its members' logits
    on all calibration tokens, x_t . r_i + b_i ~ log sum_{j in C_i} exp(z_tj), so under softmax
    scoring the merged expert receives its members' summed probability. Singletons keep theirs."""
    import torch

    x = calib.inputs.double()
    if bias is not None:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    rows, biases = [], []
    for cluster in plan_layer.clusters:
        start = weight[cluster[0]].double()
        if bias is not None:
            start = torch.cat([start, bias.reshape(-1)[cluster[0]:cluster[0] + 1].double()])
        if len(cluster) > 1:
            target = torch.logsumexp(calib.logits[:, cluster].double(), dim=1)
            start = torch.linalg.solve(gram + lam * eye, x.T @ target + lam * start)
        rows.append(start[:weight.shape[1]])
        biases.append(start[weight.shape[1]:])
    new_bias = torch.cat(biases).float() if bias is not None else None
    return torch.stack(rows).float(), new_bias


def merged_logits(calib: LayerCalib, plan_layer: MergeLayer, router: str,
                  rows: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """[N, E'] logits of the merged router: z M (centre, usage) or x R'^T + b' (fitted rows)."""
    if rows is None:
        return calib.logits.float() @ router_matrix(plan_layer, router)
    weight, bias = rows
    logits = calib.inputs.float() @ weight.T
    return logits + bias if bias is not None else logits


def merged_routing(plan_layer: MergeLayer, calib: LayerCalib, layout: ModelLayout,
                   router: str, config_changes: dict[str, int], bias: torch.Tensor | None = None,
                   rows: tuple[torch.Tensor, torch.Tensor | None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, k] new expert ids, weights [N, k]) of the merged router on the calibration
    tokens; `bias` is the original selection bias [E], `rows` fitted router rows."""
    matrix = router_matrix(plan_layer, "centre" if router == "fit" else router)
    routing = Routing.of(layout.family, layout.config).after_prune(config_changes)
    new_bias = bias.float().reshape(-1) @ matrix if bias is not None else None
    ids, weights = route(merged_logits(calib, plan_layer, router, rows), routing, new_bias)
    return ids, weights.float()


def layer_error(target: torch.Tensor, merged: Experts, ids: torch.Tensor, weights: torch.Tensor,
                x: torch.Tensor, act: Act) -> float:
    """Relative output error sum_t ||Y_t - Y'_t||^2 / sum_t ||Y_t||^2 of the merged layer."""
    error = (target - routed_output(merged, ids, weights, x, act)).pow(2).sum()
    return float(error / target.pow(2).sum().clamp_min(1e-30))


def fit_layer(original: Experts, merged: Experts, plan_layer: MergeLayer, calib: LayerCalib,
              layout: ModelLayout, router: str, config_changes: dict[str, int], act: Act,
              bias: torch.Tensor | None = None, ridge: float | None = None,
              rows: tuple[torch.Tensor, torch.Tensor | None] | None = None
              ) -> tuple[Experts, float]:
    """`merged` (E' experts, aligned averages or centres) with every merged cluster's down
    projection re-fitted (module doc), and the merged layer's `layer_error` afterwards.
    `original` holds all E experts; `bias` is the selection bias [E]; `rows` the fitted router
    rows (`--router fit`)."""
    x = calib.inputs.float()
    target = routed_output(original, calib.ids, calib.weights.float(), x, act)
    ids, weights = merged_routing(plan_layer, calib, layout, router, config_changes, bias, rows)
    gap = target - routed_output(merged, ids, weights, x, act)
    fitted = [merged.select([i]) for i in range(merged.num_experts)]
    for i, cluster in enumerate(plan_layer.clusters):
        rows_i, slots = (ids == i).nonzero(as_tuple=True)
        if len(cluster) == 1 or rows_i.numel() == 0:
            continue
        g = weights[rows_i, slots]
        start = fitted[i]
        goal = gap[rows_i] / g.unsqueeze(1) + expert_output(start, 0, x[rows_i], act)
        fitted[i] = ridge_down(start, x[rows_i], goal, g ** 2, act, ridge)
    result = stack(fitted)
    return result, layer_error(target, result, ids, weights, x, act)
