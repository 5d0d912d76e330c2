"""The down refit's Gauss-Seidel sweep (`compensate.Sweep`: primal solves for busy experts,
n x n dual solves for the others) against an independent float64 least-squares solve of each
step on the same data."""

from __future__ import annotations

import pytest
import torch

from moekit.layerfit.compensate import _sweep

HIDDEN, INNER, TOKENS, TOP_K = 12, 24, 48, 2
TRAFFIC = torch.tensor([0.45, 0.2, 0.12, 0.1, 0.08, 0.05])  # expert 0 busy: primal; others dual


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.multinomial(TRAFFIC, TOP_K, generator=gen) for _ in range(TOKENS)])
    gates = torch.softmax(torch.randn(TOKENS, TOP_K, generator=gen), -1)
    hid = torch.randn(TOKENS, TOP_K, INNER, generator=gen)
    base = [torch.randn(HIDDEN, INNER, generator=gen) / INNER ** 0.5 for _ in TRAFFIC]
    bias = [0.1 * torch.randn(HIDDEN, generator=gen) for _ in TRAFFIC]
    target = torch.randn(TOKENS, HIDDEN, generator=gen)
    return target, ids, gates, hid, base, bias


def _reference(target, ids, gates, hid, keep, base, bias, alpha, neurons):
    """Each expert in turn (busiest first), in float64: W^T = lstsq([G; sqrt(lam) I],
    [R; sqrt(lam) W0^T]) with G = a h, R = (residual + a f_old) - a b, lam = alpha ||G||^2 / I';
    then the residual takes the new outputs."""
    d = torch.float64
    target, gates, hid = target.to(d), gates.to(d), hid.to(d)
    base, bias = [b.to(d) for b in base], [b.to(d) for b in bias]
    pairs = torch.zeros(*ids.shape, HIDDEN, dtype=d)
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            pairs[t, s] = base[e] @ hid[t, s] + bias[e]
    resid = target - (pairs * gates.unsqueeze(-1)).sum(1)
    out = {}
    for e in sorted(keep, key=lambda e: -int((ids == e).sum())):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        cols = neurons[e] if neurons else torch.arange(INNER)
        a, h = gates[tok, slot].unsqueeze(1), hid[tok, slot][:, cols]
        old = pairs[tok, slot]
        g, r = a * h, resid[tok] + a * old - a * bias[e]
        lam = alpha * float(g.pow(2).sum()) / len(cols)
        lhs = torch.cat([g, lam ** 0.5 * torch.eye(len(cols), dtype=d)])
        rhs = torch.cat([r, lam ** 0.5 * base[e][:, cols].T])
        wt = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
        resid.index_add_(0, tok, -a * (h @ wt + bias[e] - old))
        out[e] = torch.zeros_like(base[e])
        out[e][:, cols] = wt.T
    return out


@pytest.mark.parametrize("trimmed", [False, True])
@pytest.mark.parametrize("alpha", [0.01, 1.0, 100.0])
def test_sweep_equals_a_least_squares_solve_of_each_step(alpha, trimmed):
    target, ids, gates, hid, base, bias = _problem()
    keep = [0, 1, 2, 3, 5]  # expert 4 dropped: its pairs are not refitted
    ids = torch.where(ids == 4, torch.full_like(ids, 5), ids)  # re-routed (not distinct: fine)
    counts = torch.bincount(ids.reshape(-1), minlength=len(TRAFFIC))
    width = 18 if trimmed else INNER
    assert counts[0] >= width and sum(0 < counts[e] < width for e in keep) >= 2  # both forms
    gen = torch.Generator().manual_seed(1)
    neurons = {e: torch.randperm(INNER, generator=gen)[:width].sort().values for e in keep} \
        if trimmed else None
    got = _sweep(target, ids, gates, hid, keep, base, bias, alpha, neurons)
    want = _reference(target, ids, gates, hid, keep, base, bias, alpha, neurons)
    assert set(got) == set(want) == {e for e in keep if counts[e]}
    for e, w in want.items():
        change = (w - base[e].double()).norm()
        assert float((got[e].double() - w).norm()) <= 1e-4 * float(change), e
        if trimmed:
            outside = torch.ones(INNER, dtype=torch.bool)
            outside[neurons[e]] = False
            assert torch.count_nonzero(got[e][:, outside]) == 0
