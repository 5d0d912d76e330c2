#!/usr/bin/env python3
"""Absorbing dropped experts' neurons (DERN-style, `absorb_experiment.py`) vs today's refit.

Runs `moekit prune --data ... --ratio R` on the mixtral-e16k2 fixture (calibration half 0:0.5 of
the five fixture texts) with `measured.refit_layer` wrapped: after each layer's ordinary refit,
every absorb variant is fitted on the same data (same target with the drift, same fit/held-out
split, same alphas) and its held-out squared layer error is printed beside the refit's. The
prune itself is unchanged (the absorbed weights are not applied). A variant is SELECT:COUNT:
`energy` or `obs` neuron choice from the pool of the COUNT dropped experts re-routed most to
each kept expert, or `full` (the whole pool kept: width (COUNT + 1) I, a ceiling).

    .venv/bin/python experiments/bench_absorb.py --tokens 8192 --variants energy:2,obs:2,full:2
"""

from __future__ import annotations

from fixture_prune import fixture_arguments, print_table, run_prune


def main() -> None:
    parser = fixture_arguments(__doc__.split("\n\n")[0], seq_len=128)
    parser.add_argument("--variants", default="energy:2,obs:2,full:2,full:8")
    args = parser.parse_args()
    variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",")]
    rows: list[list[str]] = []
    _wrap(variants, rows)
    run_prune(args)
    print_table(["layer", "unrefitted", "refit", *(f"{s}:{c}" for s, c in variants)], rows)


def _wrap(variants: list[tuple[str, int]], rows: list[list[str]]) -> None:
    """Replace `measured.refit_layer` by the refit followed by every absorb variant."""
    from absorb_experiment import absorb_layer

    from moekit.layerfit import measured
    from moekit.layerfit.compensate import layer_problem, refit_layer

    def wrapped(layer, replay, experts, inputs, keep, width=None, shift=None):
        fit = refit_layer(layer, replay, experts, inputs, keep, width, shift)
        if width is not None:
            return fit
        problem = layer_problem(replay, experts, inputs, keep, shift)
        row = [str(layer), f"{fit.held_before:.4g}", f"{fit.held_after:.4g} (a {fit.alpha})"]
        for select, count in variants:
            got = absorb_layer(replay, experts, inputs, keep, count=count, full=select == "full",
                               select=select, problem=problem)
            change = 100 * (got.held / fit.held_after - 1) if got.held else float("nan")
            row.append(f"{got.held:.4g} ({change:+.1f} %, a {got.alpha:g}, "
                       f"{got.imported} imported)")
            print(f"    layer {layer} {select}:{count}: {row[-1]}", flush=True)
        rows.append(row)
        return fit

    measured.refit_layer = wrapped


if __name__ == "__main__":
    main()
