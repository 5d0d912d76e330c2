"""Router recalibration after dropping: a closed-form Gauss-Newton refit of the kept router rows.

After a layer's selection (and its down-projection refit, `compensate`), the kept experts'
router rows W_e [H] (and router biases b_e where the family has them, e.g. gpt-oss) are refitted
so that the pruned layer's routed output on the pruned model's inputs x_t comes closer to the
refit's target y*_t = y_E(x_t) + drift_t (the unpruned layer plus the residual-stream drift).

With the routing among the kept experts K held fixed (ids, weights w(z) of the family's own
`calib.routing.route`), the routed output is linear in the logit changes d_te = dW_e . x_t:

    y_t(z + d) ~ y_t(z) + sum_e J_te d_te,   J_te = sum_s (dw_ts / dz_te) f_s(x_t)   [H],

with dw/dz by autograd through `route` (softmax or sigmoid, renormalised or not, top-k first,
scaling) and f_s the outputs of the token's routed experts (refitted down projections in).
One Gauss-Seidel sweep over K (busiest first) solves, for each expert,

    dW_e = argmin_d  sum_t (r_t - J_te d.x_t)^2 + lam d^T S d
         = (sum_t c_t x_t x_t^T + lam S)^-1 sum_t u_t x_t,   c_t = ||J_te||^2, u_t = J_te . r_t,

r_t = y*_t - y_t the current residual, S = sum_t x_t x_t^T over all tokens (the penalty is
on the logit change of every token, so an expert is not pulled onto tokens it does not get),
lam = alpha tr(A) / tr(S). Everything runs in the k-dim slot space: with F_t [k, H] the routed
outputs and G_t = F_t F_t^T, J_te = F_t^T j_te, c_t = j^T G_t j, u_t = j^T (F_t r_t).
A second kind of candidate (`_match`, HARC-style) is a ridge fit of the logit changes that make
the kept logits on the pruned model's inputs equal to the unmodified model's kept logits on its
own inputs at the same positions (undoes the upstream drift of the routing, ignores the output).
As for the down refit, the first 1 - HELD_OUT of the tokens fit; the candidate (kind, alpha) is
chosen on the rest by the *exact* held-out error (routing recomputed on the new logits, the
experts module run on the re-routed tokens), and the router is left unchanged when no candidate
lowers it. The selection bias
(`e_score_correction_bias`) only selects, has no gradient here and is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moekit.calib.hooks import module_device
from moekit.calib.routing import route
from moekit.layerfit.compensate import HELD_OUT
from moekit.layerfit.replay import expert_outputs

if TYPE_CHECKING:
    import torch

    from moekit.layerfit.replay import LayerReplay

ALPHAS = (1e-2, 1e-1, 1.0, 10.0)
MATCH = True  # also try matching the unmodified model's logits (HARC-style)
CHECK_ROWS = 64


@dataclass
class RouterFit:
    """New router rows for one layer: `weight` [E, H] and `bias` [E] (float32; only the kept
    rows differ; None when the router is left alone), held-out errors, alpha, why not (`note`)."""

    layer: int
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    held_before: float = 0.0
    held_after: float = 0.0
    alpha: float | None = None
    rel_change: float = 0.0
    note: str = ""
    stored: Any = None
    method: str = ""

    @property
    def changed(self) -> bool:
        return self.alpha is not None

    def tensors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight, bias), read back from disk when spilled (`stored`: {0: W, 1: b})."""
        if self.stored is not None:
            return self.stored[0], self.stored[1] if 1 in self.stored else None
        return self.weight, self.bias

    def spill_to(self, spill: Any, key: int) -> None:
        """Move the tensors to `spill` under `key` (read back by `tensors()`)."""
        if self.weight is None:
            return
        spill.put(key, {"0": self.weight, **({"1": self.bias} if self.bias is not None else {})})
        self.stored, self.weight, self.bias = spill.layer(key), None, None


def router_params(router: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The router module's weight [E, H] and bias [E] (None when it has none)."""
    import torch

    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    bias = getattr(router, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) and bias.dim() == 1 else None


def not_refittable(router: Any, inputs: torch.Tensor, logits: torch.Tensor) -> str:
    """'' when the router's logits are x W^T (+ b) on the captured tokens, else why not."""
    params = router_params(router)
    if params is None:
        return "the router module has no [E, H] weight"
    weight, bias = params
    if tuple(weight.shape) != (logits.shape[1], inputs.shape[1]):
        return f"router weight {list(weight.shape)} does not map hidden states to logits"
    rows = inputs[:CHECK_ROWS].float()
    z = rows @ weight.detach().float().to(rows.device).T
    if bias is not None:
        z = z + bias.detach().float().to(rows.device)
    want = logits[:CHECK_ROWS].float()
    scale = float(want.abs().max().clamp(min=1e-6))
    if float((z.cpu() - want.cpu()).abs().max()) > 0.05 * scale:
        return "the router's logits are not x W^T + b (a router with a norm or scale)"
    return ""


def refit_router(layer: int, replay: LayerReplay, experts: Any, router: Any,
                 inputs: torch.Tensor, keep: list[int], target: torch.Tensor,
                 original: torch.Tensor | None = None) -> RouterFit:
    """Fit on the first (1 - HELD_OUT) of the tokens, choose alpha on the rest (module doc).
    `experts` must hold the weights the pruned layer will use (refitted down projections);
    `target` [N, H] is y* (the unpruned routed output plus the drift). With `original` [N, E],
    the unmodified model's logits at the same positions, the logit-matching fits
    (`_match`) compete too, on the same held-out error."""
    import torch

    fit = RouterFit(layer)
    fit.note = not_refittable(router, inputs, replay.logits)
    if fit.note:
        return fit
    weight, bias = router_params(router)  # type: ignore[misc]
    num = int(inputs.shape[0])
    cut = int(num * (1 - HELD_OUT))
    x = inputs.float().cpu()
    if bias is not None:
        x = torch.cat([x, torch.ones(num, 1)], 1)
    held = (inputs[cut:], replay.logits[cut:], target[cut:])
    fit.held_before = fit.held_after = exact_error(replay, experts, *held, keep)
    slots = _slot_space(replay, experts, inputs[:cut], keep, target[:cut])
    tries = [("output", a, lambda a=a: _sweep(slots, x[:cut], keep, a)) for a in ALPHAS]
    if original is not None and MATCH:
        wanted = (original.float().cpu() - replay.logits.float().cpu())[:cut, keep]
        tries += [("match", a, lambda a=a: _match(x[:cut], wanted, a)) for a in ALPHAS]
    for method, alpha, solve in tries:
        delta = solve()
        logits = _moved(replay.logits[cut:], x[cut:], delta, keep)
        err = exact_error(replay, experts, inputs[cut:], logits, target[cut:], keep)
        if err < fit.held_after:
            fit.held_after, fit.alpha, fit.method, best = err, alpha, method, delta
    if fit.alpha is None:
        return fit
    fit.weight = weight.detach().float().cpu().clone()
    rows = torch.as_tensor(keep)
    old = fit.weight[rows].clone()
    fit.weight[rows] += best[:, : fit.weight.shape[1]]
    if bias is not None:
        fit.bias = bias.detach().float().cpu().clone()
        fit.bias[rows] += best[:, -1]
    fit.rel_change = float((fit.weight[rows] - old).norm() / old.norm().clamp(min=1e-30))
    return fit


def exact_error(replay: LayerReplay, experts: Any, inputs: torch.Tensor, logits: torch.Tensor,
                target: torch.Tensor, keep: list[int]) -> float:
    """mean_t ||y*_t - y_K(x_t)||^2 with the routing recomputed on `logits` [n, E] and the
    experts module run on the re-routed tokens (the layer's exact pruned routed output)."""
    import torch

    ids, weights = route(logits.float().cpu(), replay.routing_for(keep), replay.bias, keep)
    device = module_device(experts)  # CPU routing, engine-device experts (and inputs)
    with torch.no_grad():
        out = experts(inputs.to(device), ids.to(device), weights.to(device, inputs.dtype))
    return float((target.float().cpu() - out.float().cpu()).pow(2).sum(-1).mean())


@dataclass
class _Slots:
    """Per fit token: dw/dz restricted to the kept experts [n, k, K], G_t [n, k, k] and
    F_t r_t [n, k] of the routed outputs (see the module docstring)."""

    jac: torch.Tensor
    gram: torch.Tensor
    fr: torch.Tensor


def _slot_space(replay: LayerReplay, experts: Any, inputs: torch.Tensor, keep: list[int],
                target: torch.Tensor) -> _Slots:
    import torch

    with torch.inference_mode(False), torch.enable_grad():  # the engine runs without grad
        z = replay.logits[: inputs.shape[0]].float().clone().requires_grad_(True)
        bias = replay.bias.clone() if replay.bias is not None else None
        ids, w = route(z, replay.routing_for(keep), bias, keep)
        cols = torch.as_tensor(keep)
        jac = torch.stack([torch.autograd.grad(w[:, s].sum(), z, retain_graph=True)[0][:, cols]
                           for s in range(w.shape[1])], 1)
    outs = expert_outputs(experts, inputs, ids)  # [n, k, H] with the refits in
    resid = target.float().cpu() - (outs * w.detach().unsqueeze(-1)).sum(1)
    return _Slots(jac.detach(), outs @ outs.transpose(1, 2), (outs * resid.unsqueeze(1)).sum(-1))


def _sweep(slots: _Slots, x: torch.Tensor, keep: list[int], alpha: float) -> torch.Tensor:
    """One Gauss-Seidel sweep; returns the row changes dW [K, H(+1)] in `keep` order."""
    import torch

    fr = slots.fr.clone()
    cov = x.T @ x
    scale = abs(float(cov.diagonal().sum())) + 1e-30
    eye = torch.eye(x.shape[1])
    delta = torch.zeros(len(keep), x.shape[1])
    reach = (slots.jac.abs() > 0).sum((0, 1))
    for j in sorted(range(len(keep)), key=lambda j: -int(reach[j])):
        je = slots.jac[:, :, j]
        gje = (slots.gram @ je.unsqueeze(-1)).squeeze(-1)
        c = (je * gje).sum(1)
        used = c > 0
        if not bool(used.any()):
            continue
        xs = x[used]
        gram = (xs * c[used].unsqueeze(1)).T @ xs
        lam = alpha * float(gram.diagonal().sum()) / scale
        rhs = xs.T @ (je * fr).sum(1)[used]
        step = torch.linalg.solve(gram + lam * cov + 1e-9 * lam * scale * eye, rhs)
        fr -= (x @ step).unsqueeze(1) * gje
        delta[j] = step
    return delta


def _match(x: torch.Tensor, wanted: torch.Tensor, alpha: float) -> torch.Tensor:
    """Ridge fit of logit changes dW [K, H(+1)] with x dW^T ~ `wanted` [n, K] (the unmodified
    model's kept logits minus the pruned model's), lam = alpha tr(X^T X) / H."""
    import torch

    cov = x.T @ x
    lam = alpha * float(cov.diagonal().sum()) / x.shape[1]
    return torch.linalg.solve(cov + lam * torch.eye(x.shape[1]), x.T @ wanted).T


def _moved(logits: torch.Tensor, x: torch.Tensor, delta: torch.Tensor,
           keep: list[int]) -> torch.Tensor:
    """The logits [n, E] after adding the kept rows' changes (x [n, H(+1)], delta [K, H(+1)])."""
    import torch

    out = logits.float().cpu().clone()
    out[:, torch.as_tensor(keep)] += x @ delta.T
    return out


def apply_router(router: Any, fit: RouterFit | None) -> tuple[torch.Tensor, ...] | None:
    """Write the refitted rows into the in-memory router (its dtype); returns the originals."""
    if fit is None or not fit.changed:
        return None
    new_weight, new_bias = fit.tensors()
    weight, bias = router_params(router)  # type: ignore[misc]
    saved = (weight.detach().clone(),) + ((bias.detach().clone(),) if bias is not None else ())
    weight.data.copy_(new_weight.to(weight.dtype))  # type: ignore[union-attr]
    if bias is not None and new_bias is not None:
        bias.data.copy_(new_bias.to(bias.dtype))
    return saved


def restore_router(router: Any, saved: tuple[torch.Tensor, ...] | None) -> None:
    """Undo an `apply_router`."""
    if saved is None:
        return
    weight, bias = router_params(router)  # type: ignore[misc]
    weight.data.copy_(saved[0])
    if bias is not None and len(saved) > 1:
        bias.data.copy_(saved[1])
