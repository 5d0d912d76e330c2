"""The beam search's D(S + e) from the per-token state of S, when the routing is *local*.

D(K) (`replay.LayerReplay.error`) is a mean over tokens, D = (1/N) sum_t sq_t(K). Evaluated
from scratch it routes all N tokens among K (O(N E)) for every candidate set, n * beam * E times
per layer. The routing is local when removing an expert that a token does not route to leaves
that token's experts and weights unchanged: no routing groups, a ranking among survivors that
removals cannot change (sigmoid scores, or softmax without a selection bias; `cached_candidates`'
stable case) and weights that involve only the chosen experts (top-k before the softmax,
sigmoid, or softmax renormalised over the chosen ones without epsilon or minimum). Then, from
the state of a removal set S (each token's experts, weights and sq_t among K_S = E - S),

    D(S + e) = (1/N) sum_t sq_t',   sq_t' = sq_t(S) unless t routes to e under K_S,

and only the tokens routed to e (about N k / |K_S|) are routed again among K_S - e, plus the
tokens whose k-th and (k+1)-th selection values among K_S (nearly) tie, whose choice a removal
could flip; they are re-routed for every candidate. So a beam step costs O(N k) routing per
state instead of O(N E). The re-routed tokens' terms are those of the full evaluation (the same
computation, row by row); a kept token's term comes from the state, computed among a larger K
(weights equal up to float32 rounding), so D agrees with `error` to rounding (tests compare).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moekit.calib.routing import route, selection_values

if TYPE_CHECKING:
    import torch

    from moekit.layerfit.replay import LayerReplay

TIE = 1e-5  # relative gap of the k-th and (k+1)-th selection values counted as a possible tie


def local_routing(replay: LayerReplay) -> bool:
    """Whether `replay`'s pruned routing is local (module docstring) and D uses Gram terms."""
    r = replay.pruned_routing
    stable = r.n_group <= 1 and (r.scoring == "sigmoid" or replay.bias is None)
    weights = r.topk_first or r.scoring == "sigmoid" or (
        r.renorm and r.renorm_eps == 0 and r.renorm_min == 0)
    return stable and weights and replay.gram is not None


@dataclass
class _State:
    """Per token under K_S: experts [N, k], weights [N, k], sq_t [N] (float64), the tokens
    to re-route for every removal (ties), and per expert the tokens routed to it."""

    ids: torch.Tensor
    weights: torch.Tensor
    sq: torch.Tensor
    always: torch.Tensor
    routed: dict[int, torch.Tensor]


class IncrementalError:
    """`extend(S, e)` = D(S + e) for `search.search_drop`, from the state of S. Of the sets
    scored, only the parent and the added expert are kept; a set's state is rebuilt (its
    tokens re-routed once more) when it is extended, i.e. when the beam kept it, and states
    live for the current beam step and the one before (memory: 2 x beam states of N k ids,
    weights and rows, N sq_t)."""

    def __init__(self, replay: LayerReplay):
        self.replay = replay
        self.num = replay.num_experts
        self.states: dict[tuple[int, ...], _State] = {}
        self.parents: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}

    def extend(self, dropped: tuple[int, ...], e: int) -> float:
        parent = tuple(sorted(dropped))
        key = tuple(sorted((*parent, e)))
        state = self._state(parent)
        rows, _, _, changed = self._reroute(state, key, e)
        sq = state.sq.clone()
        sq[rows] = changed
        self.parents[key] = (parent, e)
        return float(sq.mean())

    def _reroute(self, state: _State, key: tuple[int, ...], e: int) -> tuple[torch.Tensor, ...]:
        """(rows, ids, weights, sq_t) of the tokens that removing e from K_S may change."""
        keep = [x for x in range(self.num) if x not in key]
        rows = _union(state.routed.get(e), state.always)
        if not rows.numel():
            return rows, state.ids[rows], state.weights[rows], state.sq[rows]
        ids, weights = route(self.replay.logits[rows], self._routing(keep), self.replay.bias,
                             keep)
        return rows, ids, weights, self.replay.token_errors(ids, weights, rows)

    def _routing(self, keep: list[int]) -> Any:
        return self.replay.routing_for(keep)

    def _state(self, dropped: tuple[int, ...]) -> _State:
        if dropped in self.states:
            return self.states[dropped]
        keep = [e for e in range(self.num) if e not in dropped]
        if dropped:
            parent, e = self.parents[dropped]
            base = self._state(parent)
            rows, new_ids, new_weights, new_sq = self._reroute(base, dropped, e)
            ids, weights, sq = base.ids.clone(), base.weights.clone(), base.sq.clone()
            ids[rows], weights[rows], sq[rows] = new_ids, new_weights, new_sq
        else:
            ids, weights = route(self.replay.logits, self._routing(keep), self.replay.bias, keep)
            sq = self.replay.token_errors(ids, weights)
        state = _State(ids, weights, sq, self._ties(keep), _by_expert(ids))
        self._forget(len(dropped))
        self.states[dropped] = state
        return state

    def _ties(self, keep: list[int]) -> torch.Tensor:
        """Rows whose k-th and (k+1)-th selection values among `keep` are within TIE."""
        import torch

        k = self.replay.pruned_routing.top_k
        values = selection_values(self.replay.logits, self._routing(keep), self.replay.bias,
                                  keep)
        if values.shape[1] <= k:
            return torch.arange(values.shape[0])
        top = torch.topk(values, k + 1, dim=-1).values
        gap = top[:, k - 1] - top[:, k]
        return (gap <= TIE * top[:, k - 1].abs().clamp(min=1e-30)).nonzero().flatten()

    def _forget(self, size: int) -> None:
        """A state of `size` removals is being built: states two or more smaller, and the
        parents of smaller sets, are no longer needed."""
        for store, below in ((self.states, size - 1), (self.parents, size)):
            for key in [key for key in store if len(key) < below]:
                del store[key]


def _by_expert(ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{expert: sorted rows that route to it} from ids [N, k]."""
    import torch

    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    rows = order // ids.shape[1]
    out, start = {}, 0
    for e, n in zip(experts.tolist(), counts.tolist(), strict=True):
        out[e] = rows[start:start + n]
        start += n
    return out


def _union(rows: torch.Tensor | None, always: torch.Tensor) -> torch.Tensor:
    import torch

    if rows is None:
        return always
    if not always.numel():
        return rows
    return torch.unique(torch.cat([rows, always]))
