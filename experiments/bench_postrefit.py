#!/usr/bin/env python3
"""Choosing the drop set by its error after the refit: the final beam candidates, each refitted.

Runs `moekit prune --data ... --ratio R` on the mixtral-e16k2 fixture (calibration range
START:0.5 of the five fixture texts, seq 256 as `prune` defaults) with `measured.search_drop`
asked for the FINAL best sets of its last step and `measured.refit_layer` wrapped: after each
layer's ordinary refit (of today's choice, the pre-refit best), every other final candidate is
refitted on the same data (same target with the drift, same fit/held-out split, same alphas).
Per layer it prints each candidate's pre-refit error D (the search's score, all positions) and
its held-out squared layer error after the refit, and how much lower the best post-refit
candidate is than today's. The prune itself is unchanged (today's set and refit are applied).

    .venv/bin/python experiments/bench_postrefit.py --tokens 8192 --final 8
"""

from __future__ import annotations

import time
from typing import Any

from fixture_prune import fixture_arguments, print_table, run_prune


def main() -> None:
    parser = fixture_arguments(__doc__.split("\n\n")[0], seq_len=256)
    parser.add_argument("--final", type=int, default=8, help="final candidates refitted")
    args = parser.parse_args()
    rows: list[list[str]] = []
    _wrap(args.final, rows)
    run_prune(args)
    print_table(["layer", "today D", "today held after",
                 f"best post-refit rank (of {args.final})", "its D", "its held after", "change",
                 "beam-4 best change"], rows)


def _wrap(final: int, rows: list[list[str]]) -> None:
    """Stash the final candidates of each search; refit all of them beside today's refit."""
    from moekit.layerfit import measured
    from moekit.layerfit.compensate import refit_layer
    from moekit.layerfit.search import search_drop

    found: dict[str, Any] = {}

    def searched(*a: Any, **kw: Any) -> Any:
        kw["final"] = final
        found["result"] = result = search_drop(*a, **kw)
        return result

    def wrapped(layer, replay, experts, inputs, keep, width=None, shift=None):
        fit = refit_layer(layer, replay, experts, inputs, keep, width, shift)
        if width is not None:
            return fit
        num = replay.num_experts
        result = found.pop("result", None)
        if result is None:  # a second refit of the same search (another lane): reported once
            return fit
        held = []
        start = time.perf_counter()
        for rank, (d, dropped) in enumerate(result.candidates):
            if rank == 0:
                got = fit
                assert [e for e in range(num) if e not in dropped] == list(keep)
            else:
                got = refit_layer(layer, replay, experts, inputs,
                                  [e for e in range(num) if e not in dropped], None, shift)
            held.append(got.held_after)
            print(f"    layer {layer} cand {rank}: D {d:.5g} held before {got.held_before:.5g} "
                  f"after {got.held_after:.5g} (a {got.alpha}) drop {list(dropped)}", flush=True)
        best = min(range(len(held)), key=held.__getitem__)
        best4 = min(range(min(4, len(held))), key=held.__getitem__)
        change = 100 * (held[best] / held[0] - 1)
        print(f"    layer {layer}: best rank {best} {change:+.2f} % "
              f"({time.perf_counter() - start:.0f} s for {len(held)} refits)", flush=True)
        rows.append([str(layer), f"{result.candidates[0][0]:.4g}", f"{held[0]:.4g}", str(best),
                     f"{result.candidates[best][0]:.4g}", f"{held[best]:.4g}",
                     f"{change:+.2f} %", f"{100 * (held[best4] / held[0] - 1):+.2f} %"])
        return fit

    measured.search_drop = searched
    measured.refit_layer = wrapped


if __name__ == "__main__":
    main()
