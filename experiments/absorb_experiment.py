"""Absorbing dropped experts' neurons into the kept ones (after DERN, arXiv 2509.10377):
an experiment kept beside its benchmark (`bench_absorb.py`), not part of moekit: it did not pay
(docs/history/benchmarks-2026.md, "Absorbing dropped experts").

A kept expert e keeps its width I, but each of its neuron slots (gate row, up row, down column)
may hold a neuron of a dropped expert d instead of its own, so that the tokens the removal
re-routes from d to e find d's computation there. e's candidate pool is its own I neurons plus
all neurons of the `count` dropped experts whose tokens are re-routed to e most often. Inside
the Gauss-Seidel sweep of `compensate` (same target, residuals, fit/held-out split and alphas),
each expert solves the ridge problem on its whole pool (own columns pulled towards W_e,
imported ones towards 0), keeps I pool neurons (`select`: "energy", the largest
sum a^2 h_n^2 ||W[:, n]||^2; "obs", backward elimination by the ridge objective's increase) and
solves again on those. Own neurons stay in their slots; imported ones fill the freed slots.
`full=True` keeps the whole pool (width (count + 1) I: a ceiling, not a stock checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moekit.layerfit.compensate import ALPHAS, Problem, _error, _pair_outputs, layer_problem

if TYPE_CHECKING:
    import torch

    from moekit.layerfit.replay import LayerReplay

SOURCES = 2
OBS_STEP = 16  # columns removed per backward-elimination step


@dataclass
class Pool:
    """Expert e's candidate neurons on its routed pairs: `tok`, `slot` [n] (the pairs with
    ids == e, in `nonzero` order), activations `hid` [n, P] and their labels `src` [P, 2]
    (source expert, neuron index), own neurons first."""

    tok: torch.Tensor
    slot: torch.Tensor
    hid: torch.Tensor
    src: torch.Tensor


@dataclass
class AbsorbFit:
    """Held-out error of the best alpha (None: no kept expert had fit tokens), its weights
    W [H, I'] and chosen (source, neuron) [I', 2] per kept expert, and the imported count."""

    held: float | None = None
    alpha: float | None = None
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    chosen: dict[int, torch.Tensor] = field(default_factory=dict)
    imported: int = 0


def absorb_layer(replay: LayerReplay, experts: Any, inputs: torch.Tensor, keep: list[int],
                 shift: torch.Tensor | None = None, *, count: int = SOURCES,
                 select: str = "energy", full: bool = False,
                 problem: Problem | None = None) -> AbsorbFit:
    """Fit on the first rows, choose alpha on the held-out rest (as `compensate.refit_layer`);
    `problem`: its data when already computed."""
    p = problem or layer_problem(replay, experts, inputs, keep, shift)
    found = pools(experts, inputs, p.ids, p.hid, keep, sources(replay, keep, p.ids, count))
    out = AbsorbFit()
    for alpha in ALPHAS:
        weights, hid, chosen = absorb_sweep(p, keep, alpha, found, select, full)
        held = _error(p.target[p.cut:], p.ids[p.cut:], p.gates[p.cut:], hid[p.cut:], weights,
                      p.base, p.bias)
        if out.held is None or held < out.held:
            out = AbsorbFit(held, alpha, weights, chosen,
                            sum(int((c[:, 0] != e).sum()) for e, c in chosen.items()))
    return out


def sources(replay: LayerReplay, keep: list[int], ids: torch.Tensor,
            count: int = SOURCES) -> dict[int, list[int]]:
    """Per kept expert, the (up to `count`) dropped experts whose re-routed tokens land on it
    most often: pairs (d in the original top-k, e in the new top-k but not the original)."""
    import torch

    num = replay.num_experts
    orig, _ = replay.routed(None)
    dropped = torch.ones(num, dtype=torch.bool)
    dropped[keep] = False
    moved = torch.zeros(num, num)
    for j in range(ids.shape[1]):
        e = ids[:, j]
        new = ~(orig == e.unsqueeze(1)).any(1)
        for i in range(orig.shape[1]):
            d = orig[:, i]
            mask = new & dropped[d]
            moved.index_put_((d[mask], e[mask]), torch.ones(int(mask.sum())), accumulate=True)
    return {e: [int(d) for d in torch.argsort(moved[:, e], descending=True)[:count]
                if moved[d, e] > 0] for e in keep}


def pools(experts: Any, inputs: torch.Tensor, ids: torch.Tensor, hid: torch.Tensor,
          keep: list[int], found: dict[int, list[int]]) -> dict[int, Pool]:
    """The pools of the kept experts on all their routed pairs (fit and held-out rows)."""
    import torch

    from moekit.layerfit.compensate import expert_hidden

    width = hid.shape[-1]
    out = {}
    for e in keep:
        tok, slot = (ids == e).nonzero(as_tuple=True)
        parts, labels = [hid[tok, slot]], [_labels(e, width)]
        for d in found.get(e, []):
            parts.append(expert_hidden(experts, inputs[tok], torch.full((len(tok), 1), d)))
            labels.append(_labels(d, width))
        out[e] = Pool(tok, slot, torch.cat(parts, 1), torch.cat(labels, 0))
    return out


def absorb_sweep(p: Problem, keep: list[int], alpha: float, found: dict[int, Pool],
                 select: str = "energy", full: bool = False
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]:
    """One sweep (as `compensate._sweep`) on rows < p.cut, neurons chosen from the pools:
    (W [H, I'] per kept expert, activations [N, k, I'] of all rows as the model would compute
    them after absorbing, chosen (source, neuron) [I', 2] per kept expert)."""
    import torch

    cut, width = p.cut, p.hid.shape[-1]
    wide = max(pool.hid.shape[1] for pool in found.values()) if full else width
    pairs = _pair_outputs(p.ids[:cut], p.hid[:cut], {}, p.base, p.bias)
    resid = p.target[:cut] - (pairs * p.gates[:cut].unsqueeze(-1)).sum(1)
    new_hid = torch.zeros(*p.hid.shape[:2], wide)
    new_hid[..., :width] = p.hid
    weights: dict[int, torch.Tensor] = {}
    chosen: dict[int, torch.Tensor] = {}
    for e in sorted(keep, key=lambda e: -int((p.ids[:cut] == e).sum())):
        pool = found[e]
        fit = pool.tok < cut
        if not bool(fit.any()):
            continue
        tok, slot = pool.tok[fit], pool.slot[fit]
        a, h = p.gates[tok, slot].unsqueeze(1), pool.hid[fit]
        old = pairs[tok, slot]
        want = resid[tok] + a * old
        prior = torch.zeros(p.base[e].shape[0], h.shape[1])
        prior[:, :width] = p.base[e]
        if full:
            cols = torch.arange(h.shape[1])
        elif select == "obs":
            cols = _slots(_obs(h, a, want, p.bias[e], prior, alpha, width), width)
        else:
            w = ridge(h, a, want, p.bias[e], prior, alpha)
            energy = (a * h).pow(2).sum(0) * w.pow(2).sum(0)
            cols = _slots(torch.topk(energy, width).indices, width)
        solved = ridge(h[:, cols], a, want, p.bias[e], prior[:, cols], alpha)
        new = h[:, cols] @ solved.T + p.bias[e]
        resid.index_add_(0, tok, -a * (new - old))
        pairs[tok, slot] = new
        new_hid[pool.tok, pool.slot] = 0
        new_hid[pool.tok, pool.slot, :len(cols)] = pool.hid[:, cols]
        weights[e] = torch.zeros(solved.shape[0], wide)
        weights[e][:, :len(cols)] = solved
        chosen[e] = pool.src[cols]
    return weights, new_hid, chosen


def ridge(h: torch.Tensor, a: torch.Tensor, want: torch.Tensor, bias: torch.Tensor,
          prior: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin_W sum ||a (W h + b) - want||^2 + lam ||W - prior||^2, lam = alpha tr(A) / P
    (A = sum a^2 h h^T), as in `compensate._sweep`."""
    import torch

    gram = (h * a.pow(2)).T @ h
    lam = alpha * float(gram.diagonal().sum()) / h.shape[1] + 1e-12
    cross = (want * a - a.pow(2) * bias).T @ h
    eye = torch.eye(h.shape[1])
    return torch.linalg.solve(gram + lam * eye, (cross + lam * prior).T).T


def _labels(e: int, width: int) -> torch.Tensor:
    import torch

    return torch.stack([torch.full((width,), e), torch.arange(width)], 1)


def _slots(picked: torch.Tensor, width: int) -> torch.Tensor:
    """Pool columns in slot order: own neuron n (< width) stays in slot n, imported ones fill
    the free slots in ascending order."""
    import torch

    own = picked[picked < width]
    out = torch.full((width,), -1, dtype=torch.long)
    out[own] = own
    free = (out < 0).nonzero().view(-1)
    out[free] = picked[picked >= width].sort().values
    return out


def _obs(h: torch.Tensor, a: torch.Tensor, want: torch.Tensor, bias: torch.Tensor,
         prior: torch.Tensor, alpha: float, width: int) -> torch.Tensor:
    """Backward elimination to `width` columns: drop the OBS_STEP columns whose removal raises
    the ridge objective least (||W[:, n]||^2 / [(A + lam I)^-1]_nn), re-solve, repeat."""
    import torch

    gram = (h * a.pow(2)).T @ h
    lam = alpha * float(gram.diagonal().sum()) / h.shape[1] + 1e-12
    cross = (want * a - a.pow(2) * bias).T @ h + lam * prior
    alive = torch.arange(h.shape[1])
    while len(alive) > width:
        inv = torch.linalg.inv(gram[alive][:, alive] + lam * torch.eye(len(alive)))
        cost = (cross[:, alive] @ inv).pow(2).sum(0) / inv.diagonal()
        stay = torch.topk(cost, len(alive) - min(OBS_STEP, len(alive) - width)).indices
        alive = alive[stay.sort().values]
    return alive
