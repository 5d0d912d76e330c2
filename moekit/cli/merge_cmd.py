"""`moekit merge MODEL --stats DIR --ratio R --out OUT [--data NAME=PATH ...]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from moekit.cli import eval_after
from moekit.cli.common import (
    MIN_CALIB_TOKENS,
    BatchSizeOpt,
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
    handle_errors,
    load_model_path,
    local_inputs,
    run_data_options,
    warn_uncopied,
)
from moekit.cli.progress import byte_progress
from moekit.units import parse_size

GROUP_HELP = ("hc-smoe (average-linkage clustering of mean expert outputs), m-smoe (default; "
              "dominant experts + router-logit similarity), weight (data-free weight cosine).")
METHOD_HELP = ("fit-layer (default with --router centre; centre's gate/up, every merged "
               "expert's down re-fitted to the whole layer's output, layer by layer on the "
               "merged model), fit-centre (default with other --router; centre's gate/up, down "
               "re-fitted to absorb its cluster's output), fit (aligned average gate/up, down "
               "re-fitted), aligned (neuron-aligned usage-weighted average), average "
               "(usage-weighted average).")


@handle_errors
def merge(
    ctx: typer.Context,
    model: ModelArg,
    stats: Annotated[Path | None, typer.Option(
        "--stats", help="Folder from `moekit profile` (usage weights, centre criterion).")
    ] = None,
    ratio: Annotated[float | None, typer.Option(
        "--ratio", "-r", help="Share of routed experts folded away in every MoE layer, [0, 1).")
    ] = None,
    out: MaybeOutOpt = None,
    group: Annotated[str, typer.Option("--group", "-g", help=GROUP_HELP)] = "m-smoe",
    method: Annotated[str | None, typer.Option("--method", "-m", help=METHOD_HELP)] = None,
    router: Annotated[str, typer.Option(
        "--router", help="centre (default; the centre's router row/biases), usage "
        "(usage-weighted average of the members' rows) or fit (rows fitted to the members' "
        "log-sum-exp logits).")] = "centre",
    criterion: Annotated[str, typer.Option(
        "--criterion", "-c", help="Prune criterion that picks the centres (ean, reap, "
        "reap-sum, frequency, weight).")] = "ean",
    data: DataOpt = None,
    text_field: TextFieldOpt = "text",
    data_range: RangeOpt = None,
    max_tokens: MaxTokensOpt = None,
    effort: Annotated[str, typer.Option(
        "--effort", help="With calibration: fast (the statistics on the default's positions, "
        "the grouping and the refit on a quarter of them: about 5 forward passes over them on "
        "CPU), default (statistics, grouping and refit on --max-tokens positions: about 15), "
        "best (as default, the down refit on 4x the positions streamed when the memory "
        "allows: about 30). Explicit --max-tokens/--refit-tokens override their part.")
    ] = "default",
    refit_tokens: Annotated[int | None, typer.Option(
        "--refit-tokens", help="Calibration positions per layer for fit-layer's down refit, "
        "streamed through the layer (more than the refit's --max-tokens: read further into "
        "each source; default: set by --effort).")] = None,
    seq_len: SeqLenOpt = 512,
    batch_size: BatchSizeOpt = 4,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_memory: MaxMemoryOpt = "auto",
    tokenizer: TokenizerOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the clusters; write nothing but --plan-out.")] = False,
    plan_out: PlanOutOpt = None,
    bf16_experts: Annotated[bool, typer.Option(
        "--bf16-experts", help="Quantized checkpoints: write the experts of the merged layers "
        "as bf16 (quantization_config lists them as not converted) instead of re-encoding "
        "the merged ones in the source's format.")] = False,
    plan_in: Annotated[Path | None, typer.Option(
        "--plan", help="Apply a plan JSON (from --plan-out) instead of grouping.")] = None,
    domain: DomainOpt = "all",
    ignore_fingerprint: IgnoreFingerprintOpt = False,
    protect_super: ProtectSuperOpt = True,
    max_shard_size: MaxShardSizeOpt = "5GB",
    eval_data: eval_after.EvalDataOpt = None,
    eval_range: eval_after.EvalRangeOpt = None,
    eval_max_tokens: eval_after.EvalMaxTokensOpt = 16384,
    eval_seq_len: eval_after.EvalSeqLenOpt = 512,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge the routed experts of every MoE layer into fewer experts, straight on the files.

    Groups experts into clusters, folds each cluster into its centre expert and writes a stock
    checkpoint with fewer experts per layer (same count in every layer).

    Example: moekit merge ./Mixtral --stats prof/ --ratio 0.25 --out ./merged --data web=c4.jsonl

    Example: moekit merge ./Mixtral --stats prof/ --ratio 0.5 --group weight -o ./merged

    Example: moekit merge ./Mixtral --stats prof/ --ratio 0.5 --dry-run --plan-out plan.json
    """
    from moekit.calib.data import DataSource
    from moekit.errors import InvalidArgumentError
    from moekit.io.output import check_outputs
    from moekit.ops.merge.effort import EFFORTS
    from moekit.ops.merge.plan import check_choices
    from moekit.stats.criteria import CRITERIA

    check_early(minimums=(("--batch-size", batch_size, 1), ("--eval-seq-len", eval_seq_len, 2),
                          ("--eval-max-tokens", eval_max_tokens, 2),
                          ("--refit-tokens", refit_tokens, 1)),
                choices=(("--criterion", criterion, tuple(CRITERIA)),
                         ("--effort", effort, EFFORTS)))
    run, spec = run_data_options(
        ctx, device=device, dtype=dtype, max_memory=max_memory,
        trust_remote_code=trust_remote_code, data=data, data_range=data_range,
        text_field=text_field, tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens,
        min_tokens=MIN_CALIB_TOKENS)
    source = load_model_path(model, revision)
    check_context(source, ("--seq-len", seq_len, 512), ("--eval-seq-len", eval_seq_len, 512))
    eval_opts = eval_after.eval_options(eval_data, eval_range, eval_seq_len, eval_max_tokens,
                                        run)
    method = method or ("fit-layer" if router == "centre" else "fit-centre")
    if plan_in is None:
        check_choices(group, method, router)
    if stats is None and plan_in is None and data:  # statistics recorded on the --data names
        names = ("all", *(DataSource.parse(v).name for v in data))
        check_early(choices=(("--domain", domain, names),))
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    if not dry_run and out is None:
        raise InvalidArgumentError("--out is required (or use --dry-run)")
    warn_uncopied(source)
    check_outputs(local_inputs(source, stats, plan_in, tokenizer,
                               data=[*(data or ()), *(eval_data or ())]),
                  None if dry_run else out, overwrite, {"--plan-out": (plan_out, (".json",))})
    tokens = _tokens(source, ratio, (group, method, router), bool(data), max_tokens, run,
                     effort, refit_tokens)
    options = dict(max_tokens=tokens.measured, seq_len=spec.seq_len, batch_size=batch_size,
                   device=run.device, tokenizer=spec.tokenizer, dtype=run.dtype,
                   max_memory=run.max_memory, text_field=spec.text_field,
                   fraction=spec.fraction)
    if run.trust_remote_code:  # recorded in the plan's calibration only when given
        options["trust_remote_code"] = True
    levels = {"effort": effort, "stats_tokens": tokens.statistics, "refit_tokens": tokens.refit,
              "estimate": not as_json}
    calib = _calibration(source, group, method, router, plan_in, spec, options,
                         one_pass=not dry_run, levels=levels)
    recorded = calib or (_calibration(source, group, method, router, plan_in, spec, options,
                                      required=True, levels=levels) if data else None)
    if calib is not None and plan_in is None and not as_json:
        from moekit.io.remote_code import check_remote_code

        check_remote_code(source, run.trust_remote_code)  # a model transformers cannot build:
        err_console.print(f"effort {effort}: {tokens.describe()}", soft_wrap=True)  # one line
    with _stats_folder(stats, recorded, plan_in, criterion) as stats_used:
        plan = _choose(source, stats_used, ratio, group, method, router, criterion, plan_in,
                       domain, ignore_fingerprint, calib, protect_super, bf16_experts)
    if not as_json:
        console.print(clusters_table(plan))
    for warning in plan.warnings:
        err_console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
    if plan_out is not None:
        plan.save(plan_out)
        err_console.print(f"plan written to {plan_out}")
    if dry_run:
        if as_json:
            print(json.dumps({"plan": plan.to_dict()}, indent=2))
        return
    assert out is not None
    result = _run(source, model, plan, out, overwrite, shard_bytes, ignore_fingerprint, stats,
                  calib, eval_opts, bf16_experts)
    _summary(result, as_json)


def _stats_folder(stats: Path | None, calib: Any, plan_in: Path | None, criterion: str) -> Any:
    """A context giving the stats folder: `--stats` as given, else (with calibration data)
    statistics recorded on that data in a temporary folder (`ops/merge/autostats.py`)."""
    import contextlib

    from moekit.ops.merge.autostats import stats_from_calibration

    if stats is not None or plan_in is not None or criterion == "random" or calib is None:
        return contextlib.nullcontext(stats)
    return stats_from_calibration(calib, log=err_console.print)


def _calibration(source: Path, group: str, method: str, router: str, plan_in: Path | None,
                 spec: Any, options: dict[str, Any], one_pass: bool = True,
                 required: bool = False, levels: dict[str, Any] | None = None) -> Any:
    """A lazy Calibration when the grouping or the method needs tokens, or when `required`
    (the data only records statistics); `one_pass`: with fit-layer, group inside the refit's
    run (not for --dry-run: no refit); `levels`: what --effort set (`effort`, `stats_tokens`,
    `refit_tokens`)."""
    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint
    from moekit.ops.merge.run import Calibration, needs_calibration

    if plan_in is not None:
        from moekit.ops.merge.plan import MergePlan

        loaded = MergePlan.load(plan_in)
        group, method, router = "weight", loaded.method, loaded.router
    if not required and not needs_calibration(group, method, router):
        return None
    layout = describe(Checkpoint(source))
    return Calibration(source, layout, spec.resolved_sources(), options,
                       log=err_console.print, one_pass=one_pass, **(levels or {}))


def _choose(source: Path, stats: Path | None, ratio: float | None, group: str, method: str,
            router: str, criterion: str, plan_in: Path | None, domain: str,
            ignore_fingerprint: bool, calib: Any, protect_super: bool,
            bf16_experts: bool = False) -> Any:
    from moekit.ops.merge.run import choose_merge_plan

    with err_console.status("grouping experts (calibrating, and refitting with fit-layer, "
                            "when needed)"):
        plan, _ = choose_merge_plan(source, stats=stats, ratio=ratio, group=group,
                                    method=method, router=router, criterion=criterion,
                                    plan_in=plan_in, domain=domain,
                                    ignore_fingerprint=ignore_fingerprint, calib=calib,
                                    protect_super=protect_super, bf16_experts=bf16_experts)
    return plan


def clusters_table(plan: Any):  # noqa: ANN201 - rich Table
    """Per layer: the merged clusters (new id <- original ids, centre first)."""
    from rich.table import Table

    from moekit.ops.merge.plan import WRITTEN

    title = (f"merge plan: {plan.group} / {plan.method} / router {plan.router}, "
             f"{plan.num_experts} -> {plan.num_kept} experts per layer (top-k {plan.top_k})")
    table = Table(title=title, title_justify="left", caption=f"{WRITTEN[plan.method]}",
                  caption_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("merged clusters: new <- original (centre first)")
    table.add_column("kept alone: new <- original")
    for p in plan.layers:
        merged, alone = ([f"{i}<-{','.join(map(str, c))}" for i, c in enumerate(p.clusters)
                          if (len(c) > 1) == many] for many in (True, False))
        table.add_row(str(p.layer), "; ".join(merged) or "-", "; ".join(alone) or "-")
    return table


def _run(source: Path, model: str, plan: Any, out: Path, overwrite: bool, shard_bytes: int,
         ignore_fingerprint: bool, stats: Path | None, calib: Any,
         eval_opts: dict[str, Any], bf16_experts: bool = False) -> Any:
    """The library writes the checkpoint, provenance and card; the CLI adds --eval-data."""
    from moekit.ops.merge import merge_checkpoint

    with byte_progress() as on_bytes:
        return merge_checkpoint(
            source, plan, out, overwrite=overwrite, calib=calib, max_shard_bytes=shard_bytes,
            ignore_fingerprint=ignore_fingerprint, on_bytes=on_bytes, source_name=model,
            stats_folder=stats, bf16_experts=bf16_experts,
            evaluate=lambda folder: eval_after.evaluate_output(folder, source, out, eval_opts,
                                                               "merged"))


def _summary(result: Any, as_json: bool) -> None:
    from moekit.cli.render import eval_table

    evaluation = result.extra.get("evaluation")
    if as_json:
        print(json.dumps({"out": str(result.out), "bytes_written": result.bytes_written,
                          "tensors": result.actions, "config_keys": result.config_keys,
                          "warnings": result.warnings, "plan": result.plan.to_dict(),
                          "reconstruction": result.reconstruction, "evaluation": evaluation},
                         indent=2))
        return
    for warning in result.warnings[len(result.plan.warnings):]:
        err_console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
    actions = ", ".join(f"{n} {a}" for a, n in result.actions.items())
    console.print(f"[bold green]wrote[/] {result.out}: {result.tensors_written} tensors, "
                  f"{result.bytes_written / 1e9:.2f} GB ({actions}); config: "
                  f"{', '.join(result.config_keys)}")
    if evaluation:
        console.print(eval_table(evaluation))


def _tokens(source: Path, ratio: float | None, choices: tuple[str, str, str], data: bool,
            requested: int | None, run: Any, effort: str, refit_tokens: int | None) -> Any:
    """The positions of each part (`ops.merge.effort.MergeTokens`): N = --max-tokens, or when
    (group, method, router) calibrate, or --data records statistics, the memory-aware default
    (`layerfit.tokens`); then what --effort makes of N (`best` checks its streamed refit's
    memory)."""
    from moekit.layerfit.tokens import DEFAULT_TOKENS, calibration_tokens
    from moekit.ops.merge.effort import MergeTokens, refit_fits, resolve_tokens
    from moekit.ops.merge.run import needs_calibration

    positions = requested or DEFAULT_TOKENS
    best = effort == "best" and refit_tokens is None
    if not (data or needs_calibration(*choices)) or (requested is not None and not best):
        return resolve_tokens(effort, positions, refit_tokens=refit_tokens)
    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint
    from moekit.surgery.plan import drop_count

    layout = describe(Checkpoint(source))
    if not layout.is_moe:
        return MergeTokens(positions, positions)
    num = layout.moe_layers[0].num_experts
    n_drop = drop_count(ratio, num) if ratio is not None and 0 < ratio < 1 else num // 2
    if requested is None:
        found = calibration_tokens(source, layout, n_drop=n_drop, dtype=run.dtype,
                                   device=run.device, max_memory=run.max_memory)
        if found.note():
            err_console.print(found.note(), soft_wrap=True)
        positions = found.tokens
    fits = True
    if best:
        measured = resolve_tokens(effort, positions, refit_fits=False).measured
        fits, why = refit_fits(source, layout, n_drop, measured, dtype=run.dtype,
                               device=run.device, max_memory=run.max_memory)
        if why:
            err_console.print(why, soft_wrap=True)
    return resolve_tokens(effort, positions, refit_tokens=refit_tokens, refit_fits=fits)
