"""`moekit profile MODEL --data NAME=PATH ... --out DIR`."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.common import (
    BatchSizeOpt,
    ColdestOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    ExportOpt,
    MaxMemoryOpt,
    MaxTokensOpt,
    ModelArg,
    OldExportTableOpt,
    OutOpt,
    OverwriteOpt,
    PlotLayerOpt,
    PlotsOpt,
    RangeOpt,
    RevisionOpt,
    SeqLenOpt,
    TextFieldOpt,
    TokenizerOpt,
    TrustRemoteCodeOpt,
    check_context,
    check_early,
    console,
    handle_errors,
    load_model_path,
    local_inputs,
    renamed,
    run_data_options,
)
from moekit.cli.progress import TokenProgress
from moekit.cli.render import show_profile
from moekit.runtime.distributed import distributed_command, is_writer, ready_to_write

AblationOpt = Annotated[bool, typer.Option(
    "--ablation", help="Also measure each expert's ablation importance: the mean loss change "
    "and KL when it is removed from one layer's routing (columns ablation_*; in memory only).")]
AblationTokensOpt = Annotated[int, typer.Option(
    "--ablation-tokens", help="Tokens of the ablation sample (the first windows of every "
    "domain, an equal share each).")]
AblationMethodOpt = Annotated[str, typer.Option(
    "--ablation-method", help="exact (default: re-run the model per removed expert), "
    "first-order (one forward+backward: an estimate of the loss change, no KL, a poor guide "
    "on trained routing) or both.")]


@handle_errors
@distributed_command
def profile(
    ctx: typer.Context,
    model: ModelArg,
    out: OutOpt,
    data: DataOpt = None,
    text_field: TextFieldOpt = "text",
    data_range: RangeOpt = None,
    seq_len: SeqLenOpt = 512,
    max_tokens: MaxTokensOpt = None,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_memory: MaxMemoryOpt = "auto",
    trace: Annotated[bool, typer.Option(
        "--trace", help="Also write every token's top-k ids and weights (trace.safetensors).")
    ] = False,
    merge_with: Annotated[Path | None, typer.Option(
        "--merge-with", help="Add this run to an existing profile of the same model.")] = None,
    tokenizer: TokenizerOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    revision: RevisionOpt = None,
    overwrite: OverwriteOpt = False,
    plots: PlotsOpt = True,
    plot_layer: PlotLayerOpt = None,
    export: ExportOpt = None,
    export_coldest: ColdestOpt = None,
    old_export: OldExportTableOpt = None,
    ablation: AblationOpt = False,
    ablation_tokens: AblationTokensOpt = 4096,
    ablation_method: AblationMethodOpt = "exact",
) -> None:
    """Record how the routers use their experts on calibration text, per domain.

    Writes into --out: expert_stats.csv/.parquet (tokens, weight_sum, ean_sum, reap_sum, max_norm)
    per layer, expert and domain; layer_stats.csv; coactivation.npz; metadata.json; PNG plots,
    report.md and report.html (the plots embedded).

    Prints a per-layer summary and the coldest experts.

    Example: moekit profile ./Mixtral --data code=code.jsonl --data prose=books/ --out prof

    Ablation importance (docs/profile.md): add --ablation to measure each expert's loss
    change when it is removed; prune by it with moekit prune ... --criterion ablation.

    Data-parallel: torchrun --nproc-per-node N -m moekit profile ... (docs/scale-distributed.md).
    """
    from moekit.io.output import TABLE_SUFFIXES, check_outputs
    from moekit.ops.profile import profile_model, write_output
    from moekit.stats.ablation import METHODS

    export = renamed(export, old_export, "--export-table")
    check_early(minimums=(("--batch-size", batch_size, 1),),
                choices=(("--ablation-method", ablation_method, METHODS),))
    run, spec = run_data_options(
        ctx, device=device, dtype=dtype, max_memory=max_memory,
        trust_remote_code=trust_remote_code, data=data, data_range=data_range,
        text_field=text_field, tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    path = load_model_path(model, revision)
    check_context(path, ("--seq-len", seq_len, 512))
    check_outputs(local_inputs(path, merge_with, tokenizer, data=data), out, overwrite,
                  {"--export": (export, TABLE_SUFFIXES),
                   "--export-coldest": (export_coldest, TABLE_SUFFIXES)})
    with TokenProgress() if is_writer() else nullcontext() as progress:
        result = profile_model(model, spec, run=run, batch_size=batch_size, trace=trace,
                               merge_with=merge_with, revision=revision, progress=progress,
                               ablation_tokens=ablation_tokens if ablation else None,
                               ablation_method=ablation_method)
    if not ready_to_write():  # under torchrun: every rank succeeded, and this is rank 0
        return
    names = write_output(result, out, overwrite=overwrite, inputs=(path,), plots=plots,
                         plot_layer=plot_layer)
    show_profile(result, export, export_coldest)
    if "ablation" in result.metadata:
        info = result.metadata["ablation"]
        console.print(f"ablation ({info['method']}) on {info['tokens']:,} predicted tokens: "
                      + ", ".join(f"{k} {v}x a plain forward"
                                  for k, v in info["cost_vs_plain_forward"].items()))
    console.print(f"wrote {out}: {', '.join(names)}")


