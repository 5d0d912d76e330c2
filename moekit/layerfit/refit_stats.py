"""The down-projection refit (`compensate`) from sufficient statistics, streamed over more
tokens than the selection's sample holds (`prune --refit-tokens`).

With R(t) = y_target(t) - y'_0(t) the residual of the pruned layer at the original down
projections W^0 (target and y' as in `compensate`), the refit changes W_e by D_e [H, I] and the
squared error over tokens t is

    sum_t || R(t) - sum_{e in T'(t)} a_e D_e h_e(t) ||^2
      = rr - 2 sum_e <D_e, C_e> + sum_e <D_e A_e, D_e> + 2 sum_{e<f} <D_e B_ef, D_f>,

    rr = sum_t ||R||^2,   A_e = sum_{t->e} a_e^2 h_e h_e^T [I, I],   C_e = sum_{t->e} a_e R h_e^T
    [H, I],   B_ef = sum_{t->e,f} a_e a_f h_e h_f^T [I, I] (co-routed pairs).

These sums are all one sweep needs: the Gauss-Seidel step of `compensate._sweep` for expert e,
with D_f already set for the experts refitted before it, is exactly

    D_e = (C_e - sum_{f done} D_f B_fe) (A_e + lam I)^-1,   lam = alpha tr(A_e) / I,

and the held-out error of any D is the quadratic form above on held-out sums. So the tokens can
be streamed through the layer in chunks and forgotten. Memory (float64): 2 E' (I^2 + H I) for
the fit and held-out sums, plus B for at most PAIR_BYTES of co-routed pairs (all pairs when
they fit; else the pairs most frequent in the selection sample, the others' coupling is left
out: their partner counts at its original weights, as in a Jacobi step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moekit.layerfit.compensate import ALPHAS, LayerFit

if TYPE_CHECKING:
    import torch

PAIR_BYTES = 512 << 20  # float64 cross-Grams B_ef of the fit and held-out sums together


@dataclass
class RefitStats:
    """Sums over a set of tokens (module docstring): `gram` A_e, `cross` C_e, `count` routed
    pairs per expert, `pairs` B_ef (e < f, only `allowed` pairs; None: every pair), `rr`, and
    the number of tokens."""

    keep: list[int]
    allowed: set[tuple[int, int]] | None = None
    gram: dict[int, torch.Tensor] = field(default_factory=dict)
    cross: dict[int, torch.Tensor] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    pairs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    rr: float = 0.0
    tokens: int = 0

    def add(self, ids: torch.Tensor, gates: torch.Tensor, hid: torch.Tensor,
            resid: torch.Tensor) -> None:
        """Add tokens: routed ids [n, k] (kept experts), gates a [n, k], intermediate
        activations h [n, k, I] and residuals R [n, H] at the original weights."""
        weighted = (gates.unsqueeze(-1) * hid).double()  # a h [n, k, I]
        resid = resid.double()
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            ah = weighted[tok, slot]
            _acc(self.gram, e, ah.T @ ah)
            _acc(self.cross, e, resid[tok].T @ ah)
            self.count[e] = self.count.get(e, 0) + int(tok.numel())
        k = ids.shape[1]
        for s in range(k):
            for u in range(s + 1, k):
                self._add_pairs(ids[:, s], ids[:, u], weighted[:, s], weighted[:, u])
        self.rr += float(resid.pow(2).sum())
        self.tokens += int(ids.shape[0])

    def _add_pairs(self, left: torch.Tensor, right: torch.Tensor, ah_l: torch.Tensor,
                   ah_r: torch.Tensor) -> None:
        import torch

        lo, hi = torch.minimum(left, right), torch.maximum(left, right)
        swap = left > right
        first = torch.where(swap.unsqueeze(-1), ah_r, ah_l)
        second = torch.where(swap.unsqueeze(-1), ah_l, ah_r)
        key = lo * (int(hi.max()) + 1 if hi.numel() else 1) + hi
        for value in key.unique().tolist():
            rows = (key == value).nonzero(as_tuple=True)[0]
            pair = (int(lo[rows[0]]), int(hi[rows[0]]))
            if pair[0] == pair[1] or (self.allowed is not None and pair not in self.allowed):
                continue
            _acc(self.pairs, pair, first[rows].T @ second[rows])

    def coupling(self, e: int, f: int) -> torch.Tensor | None:
        """B_ef [I_e, I_f] = sum a_e a_f h_e h_f^T (None: not co-routed or not stored)."""
        if e < f:
            return self.pairs.get((e, f))
        got = self.pairs.get((f, e))
        return None if got is None else got.T


def _acc(store: dict, key: object, value: torch.Tensor) -> None:
    if key in store:
        store[key] += value
    else:
        store[key] = value.clone()


def allowed_pairs(ids: torch.Tensor, keep: list[int], inner: int,
                  budget: int = PAIR_BYTES) -> set[tuple[int, int]] | None:
    """The co-routed pairs whose B_ef the fit and held-out sums may store in `budget` bytes:
    None (all) when every pair of `keep` fits, else the most frequent pairs among the routed
    ids [n, k] of a sample (the selection's)."""
    from collections import Counter

    capacity = budget // (2 * 8 * inner * inner)
    if len(keep) * (len(keep) - 1) // 2 <= capacity:
        return None
    counts: Counter[tuple[int, int]] = Counter()
    rows = ids.tolist()
    for row in rows:
        for s, e in enumerate(row):
            for f in row[s + 1:]:
                if e != f:
                    counts[(min(e, f), max(e, f))] += 1
    return {pair for pair, _ in counts.most_common(capacity)}


def solve_sweep(fit: RefitStats, alpha: float) -> dict[int, torch.Tensor]:
    """One Gauss-Seidel sweep over the kept experts (busiest first): the changes D_e [H, I]
    (float64) of the module docstring, for the experts with routed tokens."""
    import torch

    delta: dict[int, torch.Tensor] = {}
    order = sorted(fit.count, key=lambda e: (-fit.count[e], e))
    for e in order:
        gram = fit.gram[e]
        rhs = fit.cross[e].clone()
        for f, d_f in delta.items():
            b_fe = fit.coupling(f, e)
            if b_fe is not None:
                rhs -= d_f @ b_fe
        lam = alpha * float(gram.diagonal().sum()) / gram.shape[0] + 1e-12
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        delta[e] = torch.linalg.solve(gram + lam * eye, rhs.T).T
    return delta


def stats_error(held: RefitStats, delta: dict[int, torch.Tensor]) -> float:
    """The mean squared error per token of the layer with W_e = W_e^0 + D_e on the tokens
    summed in `held` (the quadratic form of the module docstring)."""
    total = held.rr
    for e, d_e in delta.items():
        if e not in held.gram:
            continue
        total += -2 * float((d_e * held.cross[e]).sum()) + float(((d_e @ held.gram[e]) *
                                                                  d_e).sum())
    keys = sorted(delta)
    for i, e in enumerate(keys):
        for f in keys[i + 1:]:
            b_ef = held.coupling(e, f)
            if b_ef is not None:
                total += 2 * float(((delta[e] @ b_ef) * delta[f]).sum())
    return max(total, 0.0) / max(held.tokens, 1)


def refit_from_stats(layer: int, fit: RefitStats, held: RefitStats,
                     base: dict[int, torch.Tensor]) -> LayerFit:
    """`compensate.refit_layer` on sums: each alpha's sweep on `fit`, the one with the lowest
    error on `held` kept if it beats no refit. `base`: the original W_e [H, I] of the kept
    experts (float32)."""
    out = LayerFit(layer)
    out.held_before = out.held_after = stats_error(held, {})
    for alpha in ALPHAS:
        delta = solve_sweep(fit, alpha)
        err = stats_error(held, delta)
        if err < out.held_after:
            out.held_after, out.alpha = err, alpha
            out.weights = {e: (base[e].double() + d).float() for e, d in delta.items()}
    out.rel_change = {e: float((w - base[e]).norm() / base[e].norm().clamp(min=1e-30))
                      for e, w in out.weights.items()}
    return out
