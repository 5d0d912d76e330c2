"""`moekit prune --data ...`: the calibration-data path of the prune command (measured
selection, compensation, `--criterion auto`, `--keep-params`), kept apart from the stats path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.cli.common import console, err_console, moe_layout


def choose_with_data(source: Path, options: Any, *, quiet: bool, stats: Path | None,
                     ratio: float | None, criterion: str | None, plan_in: Path | None,
                     keep: Path | None, drop: Path | None, protect: list[str],
                     min_experts: int | None, seed: int, domain: str,
                     ignore_fingerprint: bool, keep_params: float | None = None
                     ) -> tuple[Any, Any, dict[str, Any], int | None]:
    """`--data`: measured (default) or auto or a stats criterion on the calibration tokens;
    with `keep_params`, measured selection plus uniform trimming to the byte budget.
    Returns (plan, modified tensors for the surgery, calibration record for provenance,
    new expert width or None)."""
    from moekit.ops.prune.calibrated import choose_with_data as choose
    from moekit.ops.prune.rewrite import modified_tensors
    from moekit.ops.prune.select import parse_protect
    from moekit.surgery.plan import budget_rows

    checkpoint, layout, fingerprint, options, ratio = _checked(
        source, options, quiet, (stats, plan_in, keep, drop), ratio, criterion, keep_params)
    choice = choose(source, layout, fingerprint, criterion=criterion or "measured", ratio=ratio,
                    protect=parse_protect(protect, layout), min_experts=min_experts,
                    options=options, log=err_console.print if not quiet else _mode_only)
    if not quiet:
        console.print(candidates_table(choice.table()))
    chosen = choice.chosen
    if choice.stats is not None:  # the plan table shows what the calibration tokens lose
        chosen.plan.record_budget(budget_rows(chosen.plan, choice.stats))
    if chosen.width is not None:
        from moekit.ops.prune.trim import trimmed_tensors

        modified = trimmed_tensors(checkpoint, layout, chosen.plan, chosen.neurons,
                                   chosen.weights)
        rows = [{"layer": layer, "expert": e, "rel_change": round(v, 6)}
                for layer, changes in chosen.rel_change.items() for e, v in changes.items()]
    else:
        modified, rows = modified_tensors(checkpoint, layout, chosen.plan, chosen.weights,
                                          chosen.rel_change, chosen.routers, chosen.gate_up)
    record = {**choice.info, "criterion": criterion or "measured", "candidates": choice.table(),
              "modified_tensors": rows, "keep_params": keep_params,
              "expert_width": chosen.width}
    return chosen.plan, modified, record, chosen.width


def estimate_data_run(source: Path, options: Any, *, quiet: bool, stats: Path | None,
                      ratio: float | None, criterion: str | None, plan_in: Path | None,
                      keep: Path | None, drop: Path | None, protect: list[str],
                      min_experts: int | None, seed: int, domain: str,
                      ignore_fingerprint: bool, keep_params: float | None = None) -> Any:
    """`--data --dry-run`: the predicted time and peak memory (printed; also as JSON with
    `quiet`) from a short probe, without the selection."""
    import json

    from moekit.ops.prune.calibrated import estimate_run
    from moekit.ops.prune.select import parse_protect

    _, layout, fingerprint, options, ratio = _checked(
        source, options, quiet, (stats, plan_in, keep, drop), ratio, criterion, keep_params)
    found = estimate_run(source, layout, fingerprint, criterion=criterion or "measured",
                         ratio=ratio, protect=parse_protect(protect, layout),
                         min_experts=min_experts, options=options,
                         log=err_console.print if not quiet else _mode_only)
    if quiet:
        print(json.dumps({"estimate": {"seconds": round(found.seconds, 1),
                                       "peak_bytes": found.peak_bytes,
                                       "stages": {k: round(v, 2) for k, v in
                                                  found.stages.items()}}}, indent=2))
    return found


def _checked(source: Path, options: Any, quiet: bool, others: tuple[Any, ...],
             ratio: float | None, criterion: str | None, keep_params: float | None
             ) -> tuple[Any, Any, str, Any, float]:
    """The option checks of `--data` and the model: (checkpoint, layout, fingerprint, options
    (refits off for quantized experts), ratio (from --keep-params when given))."""
    from moekit.errors import InvalidArgumentError

    if any(x is not None for x in others):
        raise InvalidArgumentError("--data is given with --stats/--plan/--keep/--drop",
                                   "--data chooses the experts itself: drop the others")
    if (ratio is None) == (keep_params is None):
        raise InvalidArgumentError("give exactly one of --ratio and --keep-params",
                                   "e.g. --ratio 0.5 or --keep-params 0.5")
    checkpoint, layout, fingerprint = moe_layout(source)
    options = _stored_experts_only(checkpoint, layout, options, keep_params, quiet)
    if keep_params is not None:
        ratio = _trim_budget(layout, keep_params, options)
        if (criterion or "measured") != "measured":
            raise InvalidArgumentError(f"--keep-params works with --criterion measured, not "
                                       f"'{criterion}'")
    assert ratio is not None
    return checkpoint, layout, fingerprint, options, ratio


def _stored_experts_only(checkpoint: Any, layout: Any, options: Any,
                         keep_params: float | None, quiet: bool) -> Any:
    """Quantized experts: refitted ones are written re-encoded in their stored format (FP8
    blocks, MXFP4: `surgery/stored.py`), with a note. A format moekit cannot re-encode
    (compressed-tensors) keeps the experts as stored: the refits are turned off (asking for
    them is refused), and --keep-params (trimming) is refused for every quantized format,
    before any calibration."""
    import dataclasses

    from moekit.errors import UnsupportedModelError
    from moekit.formats import quantized_keys
    from moekit.surgery.experts import writable_format

    quantized = quantized_keys(checkpoint, [k for layer in layout.moe_layers
                                            for k in layer.routed_keys])
    if not quantized:
        return options
    if keep_params is not None:
        raise UnsupportedModelError(
            f"--keep-params: the experts are stored quantized ({quantized}) and moekit does "
            "not trim quantized experts", "use --ratio, or convert --dtype bf16 first")
    try:
        for layer in layout.moe_layers:
            writable_format(layout, layer, checkpoint)
    except UnsupportedModelError as err:
        if options.compensate:
            raise UnsupportedModelError(
                f"the experts are stored quantized ({quantized}): {err.message}",
                "drop --compensate (selection by measured damage still runs), or prune the "
                "unquantized checkpoint") from err
        if not quiet:
            err_console.print(f"note: the experts are stored quantized ({quantized}), a "
                              "format moekit does not re-encode: kept experts are copied as "
                              "stored; the refits of the kept experts are off")
        return dataclasses.replace(options, compensate=False, router=False,
                                   reconstruct_steps=0)
    if not quiet:
        err_console.print(f"note: the experts are stored quantized ({quantized}): refitted "
                          "experts are written re-encoded in that format (new scales); the "
                          "others are copied as stored")
    return options


def _mode_only(line: str) -> None:
    """With --json, only the runtime mode line goes to stderr (as profile/eval print it)."""
    if line.startswith(("in memory", "streamed layer by layer")):
        err_console.print(line)


def _trim_budget(layout: Any, keep_params: float, options: Any) -> float:
    """Set options.width for --keep-params and return the matching expert ratio."""
    from moekit.families.registry import first_value
    from moekit.ops.prune.trim import budget_split, check_trimmable

    check_trimmable(layout)
    num = layout.moe_layers[0].num_experts
    width = int(first_value(layout.config, layout.family.keys.expert_width))
    n_drop, options.width = budget_split(num, width, keep_params, layout.top_k())
    err_console.print(f"--keep-params {keep_params}: remove {n_drop} of {num} experts per layer "
                      f"and trim every survivor from {width} to {options.width} neurons "
                      f"({(num - n_drop) * options.width / (num * width):.1%} of the bytes)")
    return n_drop / num


def candidates_table(rows: list[dict[str, Any]]):  # noqa: ANN201 - rich Table
    """The scored candidates (held-out KL to the unpruned model; lower is better)."""
    from rich.table import Table

    table = Table(title="candidates (held-out calibration slice)", title_justify="left")
    for name in ("candidate", "KL(orig||cand)", "top-1 agree", "refitted experts", "seconds"):
        table.add_column(name, justify="left" if name == "candidate" else "right")
    for row in rows:
        mark = " *" if row["chosen"] else ""
        table.add_row(row["candidate"] + mark, f"{row['kl_held_out']:.5f}",
                      f"{row['top1_held_out']:.2%}", str(row["refitted_experts"]),
                      f"{row['seconds']:.0f}")
    return table


def data_sources(values: list[str], option: str) -> list[Any]:
    from moekit.calib.data import DataSource
    from moekit.errors import DataError

    sources = [DataSource.parse(v) for v in values]
    for source in sources:
        if not source.path.exists():
            raise DataError(f"{option} file {source.path} does not exist")
    return sources


def fraction(value: str | None) -> tuple[float, float]:
    from moekit.calib.data import parse_fraction

    return parse_fraction(value)
