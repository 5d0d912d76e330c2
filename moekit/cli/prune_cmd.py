"""`moekit prune MODEL --stats DIR --ratio R --criterion C --out OUT`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from moekit.cli.common import (
    MIN_CALIB_TOKENS,
    DataOpt,
    DeviceOpt,
    DomainOpt,
    DtypeOpt,
    IgnoreFingerprintOpt,
    JsonOpt,
    MaxMemoryOpt,
    MaxShardSizeOpt,
    MaxTokensOpt,
    MaybeOutOpt,
    ModelArg,
    OldReportOpt,
    OverwriteOpt,
    PlanOutOpt,
    ProtectSuperOpt,
    RangeOpt,
    RevisionOpt,
    SeqLenOpt,
    TextFieldOpt,
    TokenizerOpt,
    TrustRemoteCodeOpt,
    check_context,
    check_early,
    console,
    err_console,
    export_table,
    handle_errors,
    load_model_path,
    local_inputs,
    moe_layout,
    renamed,
    run_data_options,
    warn_uncopied,
)
from moekit.cli.eval_after import (
    EvalDataOpt,
    EvalMaxTokensOpt,
    EvalRangeOpt,
    EvalSeqLenOpt,
    eval_options,
    evaluate_output,
)
from moekit.units import parse_size

CRITERION_HELP = ("Stats: ean (default without --data; output-norm sum), reap-sum, weight "
                  "(gate-weight sum), frequency (tokens), man (mean output norm), reap (mean gate "
                  "x ||output||), random; ablation / ablation-kl / ablation-fo (loss change, KL, "
                  "first-order estimate when the expert is removed: needs `profile --ablation`). "
                  "With --data also: measured (default; re-routed layer "
                  "error, beam search, compensation if it measures better) and auto (every "
                  "candidate scored by held-out KL, the best kept).")


@handle_errors
def prune(
    ctx: typer.Context,
    model: ModelArg,
    stats: Annotated[Path | None, typer.Option(
        "--stats", help="Folder from `moekit profile` (expert_stats.csv + metadata.json).")] = None,
    ratio: Annotated[float | None, typer.Option(
        "--ratio", "-r", help="Share of routed experts removed in every MoE layer, in [0, 1).")
    ] = None,
    criterion: Annotated[str | None, typer.Option("--criterion", "-c", help=CRITERION_HELP)
                         ] = None,
    out: MaybeOutOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan and its cost; write nothing but --plan-out. With "
        "--data: print the predicted time and peak memory (a short probe) and stop.")] = False,
    plan_out: PlanOutOpt = None,
    plan_in: Annotated[Path | None, typer.Option(
        "--plan", help="Apply a plan JSON (from --plan-out) instead of choosing.")] = None,
    keep: Annotated[Path | None, typer.Option(
        "--keep", help='Experts to keep per layer: JSON {"LAYER": \\[ids]} or "LAYER: ids" lines.')
    ] = None,
    drop: Annotated[Path | None, typer.Option("--drop", help="Experts to drop, same format.")
                    ] = None,
    protect: Annotated[list[str] | None, typer.Option(
        "--protect", help="Never drop these: LAYER:EXPERT[,...] (LAYER may be *).")] = None,
    min_experts: Annotated[int | None, typer.Option(
        "--min-experts", help="Refuse plans keeping fewer experts per layer.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --criterion random.")] = 0,
    domain: DomainOpt = "all",
    ignore_fingerprint: IgnoreFingerprintOpt = False,
    max_shard_size: MaxShardSizeOpt = "5GB",
    report: Annotated[Path | None, typer.Option(
        "--export", help="Also write the budget table as .csv/.parquet/.json.")] = None,
    old_report: OldReportOpt = None,
    eval_data: EvalDataOpt = None,
    eval_range: EvalRangeOpt = None,
    eval_max_tokens: EvalMaxTokensOpt = 16384,
    eval_seq_len: EvalSeqLenOpt = 512,
    device: DeviceOpt = "auto",
    data: DataOpt = None,
    data_range: RangeOpt = None,
    text_field: TextFieldOpt = "text",
    tokenizer: TokenizerOpt = None,
    seq_len: SeqLenOpt = 512,
    max_tokens: MaxTokensOpt = None,
    refit_tokens: Annotated[int | None, typer.Option(
        "--refit-tokens", help="Calibration positions per layer for the down refit and the "
        "reconstruction, streamed through the layer (more than --max-tokens: read further into "
        "each source; default with --effort best: 4 x --max-tokens when the memory allows, "
        "else the selection's).")] = None,
    effort: Annotated[str, typer.Option(
        "--effort", help="With --data: fast (ean on the statistics, then the kept experts' down "
        "refit on a quarter of the positions: about 3 forward passes), "
        "default (the positions the search needs, beam 2, a reconstruction of 12 forward "
        "passes' multiply-adds: about 30 forward passes in all), best (32768 positions, "
        "beam 4, 4x streamed refit, 1000 reconstruction steps). Explicit --max-tokens/"
        "--beam/--refit-tokens/--reconstruct-steps/--compensate override it.")] = "default",
    beam: Annotated[int | None, typer.Option(
        "--beam", help="Beam width of the measured search (default: set by --effort).")] = None,
    compensate: Annotated[bool | None, typer.Option(
        "--compensate/--no-compensate", help="Refit kept experts' down projections (default: "
        "tried, kept if held-out KL is lower).")] = None,
    refit_router: Annotated[bool, typer.Option(
        "--refit-router/--no-refit-router", help="With compensation, also refit the kept "
        "router rows (per layer where held-out error is lower; then also scored against the "
        "down refits alone by held-out KL). Off by default: it measured neutral.")] = False,
    reconstruct_steps: Annotated[int | None, typer.Option(
        "--reconstruct-steps", help="With compensation: after the down refit, fit each "
        "layer's kept experts whole (gate/up and down) for at most this many steps, kept where "
        "held-out error is lower; 0 turns it off (default: set by --effort).")] = None,
    protect_super: ProtectSuperOpt = True,
    keep_params: Annotated[float | None, typer.Option(
        "--keep-params", help="With --data: share of routed-expert bytes to keep, reached by "
        "removing fewer experts and trimming all survivors to one narrower width.")] = None,
    dtype: DtypeOpt = "auto",
    max_memory: MaxMemoryOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove the least important routed experts of every MoE layer, straight on the files.

    Reads only headers, router weights and statistics to decide, then copies the kept bytes.
    The same number of experts is removed in every MoE layer.

    Example: moekit prune ./Mixtral --stats prof/ --ratio 0.25 --criterion reap --out ./pruned

    Example: moekit prune ./Mixtral --stats prof/ --ratio 0.5 --dry-run --plan-out plan.json

    Example: moekit prune ./Mixtral --plan plan.json --out ./pruned --eval-data code=val.py

    Example: moekit prune ./Mixtral --data web=c4.jsonl --ratio 0.5 --out ./pruned
    """
    from moekit.io.output import TABLE_SUFFIXES, check_outputs

    report = renamed(report, old_report, "--report")
    check_effort(effort)
    check_early(minimums=(
        ("--refit-tokens", refit_tokens, MIN_CALIB_TOKENS),
        ("--reconstruct-steps", reconstruct_steps, 0), ("--beam", beam, 1),
        ("--eval-seq-len", eval_seq_len, 2), ("--eval-max-tokens", eval_max_tokens, 2)))
    run, spec = run_data_options(
        ctx, device=device, dtype=dtype,
        max_memory=max_memory, trust_remote_code=trust_remote_code, data=data,
        data_range=data_range, text_field=text_field, tokenizer=tokenizer, seq_len=seq_len,
        max_tokens=max_tokens, min_tokens=MIN_CALIB_TOKENS)
    source = load_model_path(model, revision)
    check_context(source, ("--seq-len", seq_len, 512), ("--eval-seq-len", eval_seq_len, 512))
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    if not dry_run and out is None:
        from moekit.errors import InvalidArgumentError

        raise InvalidArgumentError("--out is required (or use --dry-run)")
    warn_uncopied(source)
    check_outputs(local_inputs(source, stats, plan_in, keep, drop, tokenizer,
                               data=[*(data or ()),
                                                                       *(eval_data or ())]),
                  None if dry_run else out, overwrite,
                  {"--plan-out": (plan_out, (".json",)), "--export": (report, TABLE_SUFFIXES)})
    eval_opts = eval_options(eval_data, eval_range, eval_seq_len, eval_max_tokens, run)
    options = dict(stats=stats, ratio=ratio, criterion=criterion, plan_in=plan_in, keep=keep,
                   drop=drop, protect=protect or [], min_experts=min_experts, seed=seed,
                   domain=domain, ignore_fingerprint=ignore_fingerprint)
    modified, calibration, width = None, None, None
    if keep_params is not None and not data:
        from moekit.errors import InvalidArgumentError

        raise InvalidArgumentError("--keep-params needs --data", "neurons are chosen and "
                                   "refitted on calibration data: add --data NAME=PATH")
    if data:
        from moekit.cli.prune_data import choose_with_data, estimate_data_run
        from moekit.layerfit.measured import fit_tokens
        from moekit.ops.prune.calibrated import DataOptions

        held_out = DataOptions.held_out
        data_opts = DataOptions(spec,
                                None if max_tokens is None else fit_tokens(max_tokens, held_out),
                                beam, compensate, refit_router, protect_super=protect_super,
                                run=run,
                                refit_tokens=refit_tokens, reconstruct_steps=reconstruct_steps,
                                refit_auto=refit_tokens is None, effort=effort)
        if dry_run:
            estimate_data_run(source, data_opts, quiet=as_json, keep_params=keep_params,
                              **options)
            return
        plan, modified, calibration, width = choose_with_data(
            source, data_opts, quiet=as_json, keep_params=keep_params, **options)
        stats_data = None
    else:
        plan, stats_data = choose_plan(source, protect_super=protect_super, **options)
    budget = _show_plan(plan, stats_data, report, quiet=as_json)
    if plan_out is not None:
        plan.save(plan_out)
        err_console.print(f"plan written to {plan_out}")
    if dry_run:
        if as_json:
            from moekit.ops.prune.report import no_nan

            print(json.dumps({"plan": plan.to_dict(), "budget": no_nan(budget)}, indent=2))
        return
    assert out is not None
    result = _run(source, model, plan, out, overwrite, shard_bytes, ignore_fingerprint,
                  stats, budget, eval_opts, modified, calibration, width)
    _summary(result, as_json)


def check_effort(effort: str) -> None:
    """`--effort` names a level, checked before any work."""
    from moekit.errors import InvalidArgumentError
    from moekit.ops.prune.effort import EFFORTS

    if effort not in EFFORTS:
        raise InvalidArgumentError(f"unknown --effort '{effort}'",
                                   f"use one of {', '.join(EFFORTS)}")


def choose_plan(source: Path, *, stats: Path | None, ratio: float | None, criterion: str | None,
                plan_in: Path | None, keep: Path | None, drop: Path | None, protect: list[str],
                min_experts: int | None, seed: int, domain: str,
                ignore_fingerprint: bool, protect_super: bool = True) -> tuple[Any, Any]:
    """Load/validate everything and decide: (PrunePlan, ExpertStats or None). Reads headers,
    router weights (fingerprint) and statistics only."""
    from moekit.errors import InvalidArgumentError
    from moekit.ops.prune.select import build_plan, merge_protect, parse_protect, read_expert_lists
    from moekit.stats.criteria import DEFAULT_CRITERION, super_experts, usage_criterion
    from moekit.stats.expert_stats import check_stats, load_stats
    from moekit.surgery.plan import PrunePlan, validate_plan

    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise InvalidArgumentError(f"--ratio {ratio} is outside [0, 1)",
                                   "give the share of routed experts to remove, e.g. 0.25")
    checkpoint, layout, fingerprint = moe_layout(source)
    stats_data = load_stats(stats, domain) if stats is not None else None
    notes = (check_stats(stats_data, layout, fingerprint, ignore_fingerprint)
             if stats_data is not None else [])
    if plan_in is not None:
        if any(x is not None for x in (ratio, criterion, keep, drop)) or protect:
            raise InvalidArgumentError("--plan is given with selection options",
                                       "a plan already fixes the experts; drop --ratio/"
                                       "--criterion/--keep/--drop/--protect")
        plan = validate_plan(PrunePlan.load(plan_in), layout, fingerprint, ignore_fingerprint)
        plan.warnings += notes
        return plan, stats_data
    if criterion is not None and (keep is not None or drop is not None):
        raise InvalidArgumentError("--criterion is given with --keep/--drop",
                                   "explicit lists replace the criterion: give one of them")
    guard = parse_protect(protect, layout)
    usage_only = stats_data is not None and bool(stats_data.metadata.get("usage_only"))
    if usage_only and keep is None and drop is None:
        criterion = usage_criterion(criterion, notes)
    elif stats_data is not None and protect_super and keep is None and drop is None:
        guard = merge_protect(guard, super_experts(stats_data))
    plan = build_plan(
        layout, fingerprint, criterion=criterion or DEFAULT_CRITERION, ratio=ratio,
        stats=stats_data,
        keep=read_expert_lists(keep, layout, "--keep") if keep is not None else None,
        drop=read_expert_lists(drop, layout, "--drop") if drop is not None else None,
        protect=guard, min_experts=min_experts, seed=seed)
    plan.warnings += notes
    return plan, stats_data


def _show_plan(plan: Any, stats: Any, report: Path | None, quiet: bool) -> list[dict[str, Any]]:
    from moekit.surgery.plan import budget_rows

    budget = budget_rows(plan, stats)
    plan.record_budget(budget)
    if report is not None:
        import pandas as pd

        export_table(pd.DataFrame(budget), report)
    if not quiet:
        console.print(budget_table(plan, budget))
    for warning in plan.warnings:
        err_console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
    return budget


def budget_table(plan: Any, budget: list[dict[str, Any]]):  # noqa: ANN201 - rich Table
    """The plan per layer and what it costs on the calibration data."""
    from rich.table import Table

    title = (f"prune plan: {plan.criterion}, {plan.num_dropped} of {plan.num_experts} experts "
             f"removed per layer ({plan.num_kept} kept, top-k {plan.top_k})")
    table = Table(title=title, title_justify="left")
    for name in ("layer", "kept", "removed ids", "traffic removed", "weight removed",
                 "saliency removed"):
        table.add_column(name, justify="left" if name == "removed ids" else "right")
    for row in budget:
        shares = [_pct(row[k]) for k in ("traffic_removed", "weight_removed", "saliency_removed")]
        table.add_row(str(row["layer"]), str(row["kept"]), row["removed_ids"] or "-", *shares)
    return table


def _pct(value: float) -> str:
    return "-" if value != value else f"{value:.1%}"  # NaN: no statistics


def _run(source: Path, model: str, plan: Any, out: Path, overwrite: bool, shard_bytes: int,
         ignore_fingerprint: bool, stats: Path | None, budget: list[dict[str, Any]],
         eval_opts: dict[str, Any], modified: Any = None,
         calibration: dict[str, Any] | None = None, width: int | None = None) -> Any:
    """The library writes the checkpoint, provenance and card; the CLI adds --eval-data."""
    from moekit.cli.progress import byte_progress
    from moekit.ops.prune import prune_checkpoint

    with byte_progress() as on_bytes:
        return prune_checkpoint(
            source, plan, out, overwrite=overwrite, max_shard_bytes=shard_bytes,
            ignore_fingerprint=ignore_fingerprint, on_bytes=on_bytes, modified=modified,
            expert_width=width, source_name=model, stats_folder=stats, budget=budget,
            calibration=calibration,
            evaluate=lambda folder: evaluate_output(folder, source, out, eval_opts, "pruned"))


def _summary(result: Any, as_json: bool) -> None:
    from moekit.cli.render import eval_table

    evaluation = result.extra.get("evaluation")
    if as_json:
        print(json.dumps({"out": str(result.out), "bytes_written": result.bytes_written,
                          "tensors": result.actions, "config_keys": result.config_keys,
                          "warnings": result.warnings, "plan": result.plan.to_dict(),
                          "evaluation": evaluation}, indent=2))
        return
    for warning in result.warnings[len(result.plan.warnings):]:
        err_console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
    actions = ", ".join(f"{n} {a}" for a, n in result.actions.items())
    console.print(f"[bold green]wrote[/] {result.out}: {result.tensors_written} tensors, "
                  f"{result.bytes_written / 1e9:.2f} GB ({actions}); config: "
                  f"{', '.join(result.config_keys)}")
    if evaluation:
        console.print(eval_table(evaluation))
