"""Compensation after dropping: closed-form ridge refit of the kept experts' down projections.

After removal the layer's routed output is y'(t) = sum_{e in T'(t)} a_e(t) (W_e h_e(t) + b_e)
with a = the re-routed gates, h_e the expert's intermediate activation [I] and W_e [H, I] its down
projection. Each kept expert in turn (Gauss-Seidel, one sweep) solves

    W_e = argmin_W  sum_{t -> e} || a (W h + b) - r_e(t) ||^2 + lam ||W - W_e^0||_F^2
        = (C + lam W_e^0)(A + lam I)^-1,   A = sum a^2 h h^T,  C = sum a (r_e - a b) h^T,

where r_e(t) = y_E(t) - (y'(t) - a f_e(t)) is what the unpruned layer wants from e on token t and
lam = alpha * tr(A) / I. The token sample is split: the refit uses the first part, alpha is
chosen on the held-out rest among ALPHAS, and the layer is left unchanged when no alpha lowers the
held-out error (so compensation is only ever kept where it measures better).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import moekit.layerfit.replay
from moekit.errors import UnsupportedModelError
from moekit.layerfit.replay import chunks
from moekit.runtime.engine import trim_heap

if TYPE_CHECKING:
    import torch

    from moekit.layerfit.replay import LayerReplay

ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0)
HELD_OUT = 0.25


@dataclass
class LayerFit:
    """The outcome for one layer: new down projections [H, I] (float32) of the kept experts
    that changed, held-out errors before/after, the chosen alpha (None: not compensated)."""

    layer: int
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    rel_change: dict[int, float] = field(default_factory=dict)
    held_before: float = 0.0
    held_after: float = 0.0
    alpha: float | None = None
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    sample: tuple[torch.Tensor, ...] | None = None  # streamed (inputs, ids, gates, target)


def down_weight(experts: Any, e: int) -> torch.Tensor:
    """Expert e's down projection as float32 [H, I] on the CPU, where the refit runs (whatever
    the in-memory orientation and device)."""
    w = experts.down_proj[e].detach().float().cpu()
    return w.T if getattr(experts, "is_transposed", False) else w


def down_bias(experts: Any, e: int, hidden: int) -> torch.Tensor:
    import torch

    if getattr(experts, "has_bias", False):
        return experts.down_proj_bias[e].detach().float().cpu()
    return torch.zeros(hidden)


def set_down_weight(experts: Any, e: int, weight: torch.Tensor) -> None:
    """Write W [H, I] into the in-memory experts module (in its dtype and orientation)."""
    w = weight.T if getattr(experts, "is_transposed", False) else weight
    experts.down_proj.data[e] = w.to(experts.down_proj.dtype)


def expert_hidden(experts: Any, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """h_e(x) [N, I] (float32, CPU) for rows [N, H] and ids [N, 1]: the experts module run with
    its down projection temporarily replaced by selections of identity blocks (H columns at a
    time), on `replay.EXPERT_BYTES` of outputs at a time."""
    import torch

    if getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedModelError("experts with a post-expert norm cannot be refitted",
                                    "use --no-compensate")
    saved_w = experts.down_proj
    saved_b = getattr(experts, "down_proj_bias", None) if getattr(experts, "has_bias", False) \
        else None
    transposed = getattr(experts, "is_transposed", False)
    num, hidden = saved_w.shape[0], rows.shape[1]
    inner = saved_w.shape[1] if transposed else saved_w.shape[2]
    rows, ids = rows.to(saved_w.device), ids.to(saved_w.device)  # ids: the replay's CPU routing
    ones = torch.ones((rows.shape[0], 1), dtype=rows.dtype, device=rows.device)
    out = torch.empty((rows.shape[0], inner))
    try:
        for start in range(0, inner, hidden):
            width = min(hidden, inner - start)
            block = torch.zeros(hidden, inner, dtype=saved_w.dtype, device=saved_w.device)
            block[torch.arange(width), start + torch.arange(width)] = 1
            block = block.T if transposed else block
            experts.down_proj = torch.nn.Parameter(block.expand(num, *block.shape).contiguous(),
                                                   requires_grad=False)
            if saved_b is not None:
                experts.down_proj_bias = torch.nn.Parameter(torch.zeros_like(saved_b),
                                                            requires_grad=False)
            for a, b in chunks(rows.shape[0], hidden, moekit.layerfit.replay.EXPERT_BYTES // 4):
                with torch.no_grad():
                    got = experts(rows[a:b], ids[a:b], ones[a:b])
                out[a:b, start:start + width] = got[:, :width]  # float32 upcast: exact
                del got
    finally:
        experts.down_proj = saved_w
        if saved_b is not None:
            experts.down_proj_bias = saved_b
        trim_heap()
    return out


@dataclass
class Problem:
    """The refit's data: re-routed ids, gates [N, k], activations h [N, k, I], target [N, H]
    (with the drift), down projections and biases of every expert, the fit/held-out split."""

    ids: torch.Tensor
    gates: torch.Tensor
    hid: torch.Tensor
    target: torch.Tensor
    base: list[torch.Tensor]
    bias: list[torch.Tensor]
    cut: int

    def astuple(self) -> tuple[Any, ...]:
        return (self.ids, self.gates, self.hid, self.target, self.base, self.bias, self.cut)


def layer_problem(replay: LayerReplay, experts: Any, inputs: torch.Tensor, keep: list[int],
                  shift: torch.Tensor | None = None) -> Problem:
    """`refit_layer`'s data on the tokens `inputs` [N, H] re-routed among `keep`."""
    ids, gates = replay.routed(keep)
    num, k = ids.shape
    hid = expert_hidden(experts, inputs.repeat_interleave(k, dim=0), ids.reshape(-1, 1))
    base = [down_weight(experts, e) for e in range(replay.num_experts)]
    bias = [down_bias(experts, e, replay.target.shape[1]) for e in range(replay.num_experts)]
    target = replay.target if shift is None else replay.target + shift.float().cpu()
    return Problem(ids, gates, hid.view(num, k, -1), target, base, bias,
                   int(num * (1 - HELD_OUT)))


def refit_layer(layer: int, replay: LayerReplay, experts: Any, inputs: torch.Tensor,
                keep: list[int], width: int | None = None,
                shift: torch.Tensor | None = None) -> LayerFit:
    """Fit on the first (1 - HELD_OUT) of the tokens, choose alpha on the rest (module doc).

    With `width`, every kept expert is also trimmed to its `width` neurons of largest
    contribution sum a^2 h_n^2 ||W[:, n]||^2 (`fit.neurons`); its refitted W [H, I] is zero
    outside them, and plain truncation (no refit) is the baseline the alphas must beat.

    `shift` [N, H] is added to the target y_E: the drift of the residual stream at this
    layer's output (original model minus the model pruned so far, `measured`), so that the
    refit also absorbs what earlier layers' pruning changed."""
    ids, gates, hid, target, base, bias, cut = layer_problem(replay, experts, inputs, keep,
                                                             shift).astuple()
    fit = LayerFit(layer)
    held_pairs = _pair_outputs(ids[cut:], hid[cut:], {}, base, bias)
    held = (target[cut:], ids[cut:], gates[cut:], hid[cut:], held_pairs)
    fit.held_before = fit.held_after = _held_error(held, {}, bias)
    if width is not None:
        fit.neurons = neuron_subsets(ids[:cut], gates[:cut], hid[:cut], keep, base, width)
        fit.weights = {e: base[e] * _mask(base[e], cols) for e, cols in fit.neurons.items()}
        fit.held_after = _held_error(held, fit.weights, bias)
    sweep = Sweep.prepare(target[:cut], ids[:cut], gates[:cut], hid[:cut], keep, base, bias,
                          fit.neurons or None)
    for alpha in ALPHAS:
        weights = sweep.run(alpha)
        err = _held_error(held, weights, bias)
        if err < fit.held_after:
            fit.held_after, fit.alpha, fit.weights = err, alpha, weights
    fit.rel_change = {e: float((w - base[e]).norm() / base[e].norm().clamp(min=1e-30))
                      for e, w in fit.weights.items()}
    return fit


def neuron_subsets(ids: torch.Tensor, gates: torch.Tensor, hid: torch.Tensor, keep: list[int],
                   base: list[torch.Tensor], width: int) -> dict[int, torch.Tensor]:
    """Per kept expert, the sorted ids of its `width` neurons with the largest contribution
    energy sum_{t -> e} a^2 h_n(t)^2 * ||W[:, n]||^2 on the routed tokens."""
    import torch

    out = {}
    for e in keep:
        mask = ids == e
        energy = ((gates[mask].unsqueeze(1) * hid[mask]).pow(2).sum(0)
                  * base[e].pow(2).sum(0))
        out[e] = torch.topk(energy, width).indices.sort().values
    return out


def _mask(weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    import torch

    mask = torch.zeros(weight.shape[1])
    mask[cols] = 1.0
    return mask


def _pair_outputs(ids: torch.Tensor, hid: torch.Tensor, weights: dict[int, torch.Tensor],
                  base: list[torch.Tensor], bias: list[torch.Tensor]) -> torch.Tensor:
    """f [n, k, H] of every routed pair from the (possibly refitted) down projections."""
    import torch

    out = torch.empty(*ids.shape, base[0].shape[0])
    for e in ids.unique().tolist():
        mask = ids == e
        out[mask] = hid[mask] @ weights.get(e, base[e]).T + bias[e]
    return out


def _error(target: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, hid: torch.Tensor,
           weights: dict[int, torch.Tensor], base: list[torch.Tensor],
           bias: list[torch.Tensor]) -> float:
    pred = (_pair_outputs(ids, hid, weights, base, bias) * gates.unsqueeze(-1)).sum(1)
    return float((target - pred).pow(2).sum(-1).mean())


def _held_error(held: tuple[torch.Tensor, ...], weights: dict[int, torch.Tensor],
                bias: list[torch.Tensor]) -> float:
    """`_error` on held-out (target, ids, gates, hid, pair outputs at the original weights):
    only the pairs of the experts in `weights` are recomputed."""
    target, ids, gates, hid, pairs = held
    if weights:
        pairs = pairs.clone()
        for e, weight in weights.items():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel():
                pairs[tok, slot] = hid[tok, slot] @ weight.T + bias[e]
    pred = (pairs * gates.unsqueeze(-1)).sum(1)
    return float((target - pred).pow(2).sum(-1).mean())


@dataclass
class _Ridge:
    """One kept expert's part of the sweep that no alpha changes: its routed pairs (`tok`,
    `slot`), gates a [n, 1], activations h [n, I'] on its kept neurons `cols`, the pairs'
    outputs at the original weights `old` [n, H], the trace of A = sum a^2 h h^T, and either A
    [I', I'] (primal, n >= I') or the kernel K = G G^T and M = h G^T [n, n] of G = a h
    (float64; dual, n < I')."""

    expert: int
    tok: torch.Tensor
    slot: torch.Tensor
    a: torch.Tensor
    h: torch.Tensor
    cols: Any
    old: torch.Tensor
    trace: float
    gram: torch.Tensor | None = None
    kernel: torch.Tensor | None = None
    mixed: torch.Tensor | None = None


@dataclass
class Sweep:
    """One Gauss-Seidel sweep of ridge refits over the kept experts (busiest first), run once
    per alpha from the same prepared pieces (`_Ridge`). Expert e's step minimises
    ||G W^T - R||^2 + lam ||W - W^0||^2 (G = a h, R = want - a b, module doc). With n routed
    pairs and I' columns it is solved in whichever form is smaller:

        primal (n >= I'):  W^T = (A + lam I)^-1 (G^T R + lam W^0 T)                [I', I']
        dual   (n <  I'):  W^T = W^0 T + G^T (K + lam I)^-1 E,  E = R - G W^0 T    [n, n]

    (the same solution: (A + lam I) G^T = G^T (K + lam I)). E is the expert's share of the
    current residual, resid(t) + a (f_e^0(t) - b - h W^0 T) (the last term vanishes without
    neuron trimming), and the step changes the residual by -a M (K + lam I)^-1 E. The experts
    follow one another (each sees the residual the earlier ones left), so the steps are not
    batched across experts; each is a few small dense products."""

    resid: torch.Tensor
    ridges: list[_Ridge]
    base: list[torch.Tensor]
    bias: list[torch.Tensor]
    trimmed: bool

    @staticmethod
    def prepare(target: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                hid: torch.Tensor, keep: list[int], base: list[torch.Tensor],
                bias: list[torch.Tensor], neurons: dict[int, torch.Tensor] | None) -> Sweep:
        """The residual at the original weights and each kept expert's `_Ridge`."""
        import torch

        pairs = _pair_outputs(ids, hid, {}, base, bias)
        resid = target - (pairs * gates.unsqueeze(-1)).sum(1)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # each expert's pairs in (token, slot) order
        counts = torch.bincount(flat, minlength=len(base)).tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        ridges = []
        for e in sorted(keep, key=lambda e: -counts[e]):
            if counts[e] == 0:
                continue
            rows = order[starts[e]:starts[e + 1]]
            tok, slot = rows // ids.shape[1], rows % ids.shape[1]
            cols = neurons[e] if neurons else slice(None)
            a, h = gates[tok, slot].unsqueeze(1), hid[tok, slot][:, cols]
            ridge = _Ridge(e, tok, slot, a, h, cols, pairs[tok, slot], 0.0)
            if h.shape[0] >= h.shape[1]:
                ridge.gram = (h * a.pow(2)).T @ h
                ridge.trace = float(ridge.gram.diagonal().sum())
            else:
                g = (a * h).double()
                ridge.kernel, ridge.mixed = g @ g.T, h.double() @ g.T
                ridge.trace = float(ridge.kernel.diagonal().sum())
            ridges.append(ridge)
        return Sweep(resid, ridges, base, bias, neurons is not None)

    def run(self, alpha: float) -> dict[int, torch.Tensor]:
        """The refitted W [H, I] (float32, zero outside the kept neurons) of every expert with
        routed pairs, for ridge strength lam = alpha tr(A) / I' per expert."""
        import torch

        resid = self.resid.clone()
        weights: dict[int, torch.Tensor] = {}
        for r in self.ridges:
            e, a, h = r.expert, r.a, r.h
            lam = alpha * r.trace / h.shape[1] + 1e-12
            start = self.base[e][:, r.cols]
            if r.gram is not None:
                want = resid[r.tok] + a * r.old  # what e's weighted output should be
                cross = (want * a - a.pow(2) * self.bias[e]).T @ h
                eye = torch.eye(h.shape[1])
                solved = torch.linalg.solve(r.gram + lam * eye, (cross + lam * start).T).T
                change = a * (h @ solved.T + self.bias[e] - r.old)
            else:
                share, change = resid[r.tok], 0.0  # trimmed: a h W^0 T off the kept neurons
                if self.trimmed:
                    change = (a * h) @ start.T - a * (r.old - self.bias[e])
                    share = share - change
                eye = torch.eye(h.shape[0], dtype=torch.float64)
                dual = torch.linalg.solve(r.kernel + lam * eye, share.double())
                solved = start + dual.float().T @ (a * h)
                change = change + a * (r.mixed @ dual).float()
            resid.index_add_(0, r.tok, -change)
            if self.trimmed:
                weight = torch.zeros_like(self.base[e])
                weight[:, r.cols] = solved
            else:
                weight = solved
            weights[e] = weight
        return weights


def _sweep(target: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor, hid: torch.Tensor,
           keep: list[int], base: list[torch.Tensor], bias: list[torch.Tensor], alpha: float,
           neurons: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """One sweep at one alpha (`Sweep`); with `neurons`, each expert is refitted on its kept
    neurons only (zero columns elsewhere)."""
    return Sweep.prepare(target, ids, gates, hid, keep, base, bias, neurons).run(alpha)
