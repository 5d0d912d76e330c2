"""Choosing the experts to drop by measured damage: beam search over removal sets.

Starting from the empty set, each step extends every set in the beam by one more droppable
expert (not protected; with balanced groups, not from a group whose quota is used up), scores
every extension by D(K) = `LayerReplay.error(keep)` (the re-routed layer error), and keeps the
`beam` lowest (beam = 1 is greedy removal). After n steps the set with the lowest D is chosen.
Cost: n * beam * E evaluations of the replay, each O(N E) routing + O(N k^2) Gram terms, or,
with local routing (`incremental`), O(N k) routing per beam state and step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SearchResult:
    """The chosen removal set, its error and D({e}) of removing each expert alone."""

    dropped: tuple[int, ...]
    error: float
    single: tuple[float, ...]


def search_drop(error: Callable[[list[int]], float], num_experts: int, n_drop: int, *,
                protected: frozenset[int] = frozenset(), groups: int = 1, beam: int = 4,
                extend: Callable[[tuple[int, ...], int], float] | None = None) -> SearchResult:
    """Beam search for `n_drop` experts to remove; `error(keep)` scores a kept set, and
    `extend(dropped, e)` (default: `error` of the complement) the removal set dropped + e
    (`incremental.IncrementalError.extend`: the same D from the state of `dropped`).

    With `groups` > 1 the experts are split into equal contiguous groups and n_drop / groups
    are removed from each (the caller checks divisibility)."""
    size = num_experts // groups
    quota = n_drop // groups if groups > 1 else n_drop
    singles = tuple(error(_keep(num_experts, (e,))) for e in range(num_experts))
    states: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    for _ in range(n_drop):
        scored: dict[tuple[int, ...], float] = {}
        for _, dropped in states:
            for e in range(num_experts):
                if e in dropped or e in protected:
                    continue
                if groups > 1 and sum(1 for d in dropped if d // size == e // size) >= quota:
                    continue
                key = tuple(sorted((*dropped, e)))
                if key not in scored:
                    scored[key] = extend(dropped, e) if extend is not None else \
                        error(_keep(num_experts, key))
        if not scored:
            break
        states = sorted(((v, k) for k, v in scored.items()))[:max(beam, 1)]
    best_error, best = states[0]
    return SearchResult(best, best_error, singles)


def _keep(num_experts: int, dropped: tuple[int, ...]) -> list[int]:
    return [e for e in range(num_experts) if e not in dropped]
