"""`moekit upcycle DENSE --arch TARGET --experts E --top-k K --method M --out OUT`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.common import (
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    MaxTokensOpt,
    ModelArg,
    OverwriteOpt,
    RangeOpt,
    RevisionOpt,
    SeqLenOpt,
    TextFieldOpt,
    TokenizerOpt,
    TrustRemoteCodeOpt,
    check_context,
    console,
    handle_errors,
    load_model_path,
    local_inputs,
    run_data_options,
    warn_uncopied,
)
from moekit.cli.heading import headed
from moekit.units import parse_size


@handle_errors
def upcycle(
    ctx: typer.Context,
    model: ModelArg,
    experts: Annotated[int, typer.Option("--experts", "-e", help="Routed experts per layer.")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output folder (required unless --dry-run).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Experts per token.")] = 2,
    arch: Annotated[str | None, typer.Option(
        "--arch", help="Target family: mixtral (llama, mistral), qwen2_moe (qwen2), qwen3_moe "
                       "(qwen3). Default: the only one for the source.")] = None,
    method: Annotated[str, typer.Option(
        "--method", "-m", help="copy | split (fine-grained) | drop (Drop-Upcycling).")] = "copy",
    router: Annotated[str, typer.Option(
        "--router", help="Router init: random | zero | data (k-means of calibration "
                         "hidden states).")] = "random",
    router_std: Annotated[float, typer.Option("--router-std",
                                              help="Std of the random router.")] = 0.02,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random choice.")] = 0,
    split_order: Annotated[str, typer.Option(
        "--split-order", help="split: contiguous | random | cluster (needs --data).")
    ] = "contiguous",
    drop_ratio: Annotated[float, typer.Option(
        "--drop-ratio", help="drop: fraction of each expert's neurons re-initialised.")] = 0.5,
    shared_expert: Annotated[bool, typer.Option(
        "--shared-expert", help="qwen2_moe: add a shared expert (the dense FFN for copy/drop)."
    )] = False,
    shared_neurons: Annotated[int | None, typer.Option(
        "--shared-neurons", help="split: neurons given to the shared expert.")] = None,
    data: DataOpt = None,
    data_range: RangeOpt = None,
    text_field: TextFieldOpt = "text",
    tokenizer: TokenizerOpt = None,
    max_tokens: MaxTokensOpt = None,
    seq_len: SeqLenOpt = 512,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    norm_topk_prob: Annotated[bool, typer.Option(
        "--norm-topk-prob/--no-norm-topk-prob", help="qwen targets: renormalise top-k weights."
    )] = True,
    aux_loss_coef: Annotated[float, typer.Option(
        "--aux-loss-coef", help="router_aux_loss_coef written into the config.")] = 0.001,
    max_memory: MaxMemoryOpt = "auto",
    max_shard_size: Annotated[str, typer.Option(
        "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB.")] = "5GB",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan "
                                                            "without writing.")] = False,
    overwrite: OverwriteOpt = False,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Turn a dense checkpoint into an MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE).

    copy keeps the model's function exactly (renormalised top-k); split keeps it with
    --router zero --top-k E; drop re-initialises part of every expert on purpose.

    Example: moekit upcycle ./Llama-dense --arch mixtral -e 8 -k 2 --method copy -o ./moe
    """
    from moekit.io.output import check_outputs
    from moekit.ops.upcycle import UpcycleOptions, output_tensors, plan_upcycle

    run, spec = run_data_options(
        ctx, device=device, dtype=dtype, max_memory=max_memory,
        trust_remote_code=trust_remote_code, data=data, data_range=data_range,
        text_field=text_field, tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    options = UpcycleOptions(
        experts=experts, top_k=top_k, method=method, arch=arch, router=router,
        router_std=router_std, seed=seed, split_order=split_order, drop_ratio=drop_ratio,
        shared_expert=shared_expert, shared_neurons=shared_neurons,
        norm_topk_prob=norm_topk_prob, aux_loss_coef=aux_loss_coef,
        max_shard_bytes=parse_size(max_shard_size, "--max-shard-size"), data=spec, run=run)
    if out is None and not dry_run:
        from moekit.errors import InvalidArgumentError

        raise InvalidArgumentError("--out is required", "give an output folder, or --dry-run")
    source = load_model_path(model, revision)
    check_context(source, ("--seq-len", seq_len, 512))
    warn_uncopied(source)
    check_outputs(local_inputs(source, tokenizer, data=data), None if dry_run else out, overwrite)
    if dry_run:
        from moekit.ops.upcycle import Prepared, summarize
        from moekit.ops.upcycle.config import validate_config

        plan = plan_upcycle(source, options)
        validate_config(plan.config, plan.family, plan.shape)
        report = summarize(plan, Prepared(), output_tensors(plan, Prepared(), set(), None), out)
        _show(report, as_json, title="plan (nothing written)")
        return
    report = _run(source, out, options, overwrite, model, quiet=as_json)
    _show(report, as_json, title=f"wrote {out}")


def _run(source: Path, out: Path, options, overwrite: bool, name: str,  # noqa: ANN001
         quiet: bool):  # noqa: ANN202 - UpcycleReport
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from moekit.ops.upcycle import upcycle as run_upcycle

    progress = Progress("[progress.description]{task.description}", BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                        disable=quiet or not console.is_terminal)
    task = progress.add_task("writing tensors", total=None, start=False)
    started = []

    def start(count: int) -> None:  # after validation and calibration: errors stay one line
        progress.update(task, total=count)
        progress.start_task(task)
        progress.start()
        started.append(True)

    try:
        return run_upcycle(source, out, options, overwrite=overwrite, source_name=name,
                           on_start=start, on_tensor=lambda t: progress.advance(task))
    finally:
        if started:
            progress.stop()


def _show(report, as_json: bool, title: str) -> None:  # noqa: ANN001
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [("target", f"{report.family} ({report.architecture})"),
            ("method / router", f"{report.method} / {report.router}"),
            ("experts / top-k", f"{report.experts} / {report.top_k}"),
            ("expert width", str(report.expert_width)),
            ("shared expert width", str(report.shared_width)),
            ("total params", f"{report.total_params:,}"),
            ("active params / token", f"{report.active_params:,}"),
            ("output size", f"{report.output_bytes / 1e9:.3f} GB"),
            ("equal to dense at init", report.function_preserving)]
    if report.calibration_tokens:
        rows.append(("calibration tokens", f"{report.calibration_tokens:,}"))
    for field, value in rows:
        table.add_row(field, value)
    console.print(headed(table))
    if report.kernel_note:
        console.print(f"[yellow]note:[/] {report.kernel_note}")
