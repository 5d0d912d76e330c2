"""`moekit profile MODEL --data NAME=PATH ... --out DIR`."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from moekit.cli.common import (
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    MaxMemoryOpt,
    ModelArg,
    OutOpt,
    OverwriteOpt,
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
)
from moekit.runtime.distributed import distributed_command, is_writer, ready_to_write

PlotsOpt = Annotated[bool, typer.Option("--plots/--no-plots",
                                        help="Write PNG plots, report.md and report.html.")]
PlotLayerOpt = Annotated[int | None, typer.Option(
    "--plot-layer", help="Layer for the co-activation plot (default: the most uneven).")]
ExportOpt = Annotated[Path | None, typer.Option(
    "--export-table", help="Also write the per-layer table as .csv/.parquet/.json.")]
ColdestOpt = Annotated[Path | None, typer.Option(
    "--export-coldest", help="Also write the coldest-experts table as .csv/.parquet/.json.")]
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
    model: ModelArg,
    out: OutOpt,
    data: DataOpt = None,
    text_field: TextFieldOpt = "text",
    data_range: RangeOpt = None,
    seq_len: SeqLenOpt = 512,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help="At most this many tokens per data source.")] = 100_000,
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
    from moekit.calib.data import DataSource, parse_fraction
    from moekit.io.output import TABLE_SUFFIXES, check_outputs
    from moekit.ops.profile import profile_model, write_output
    from moekit.runtime.loading import DTYPES
    from moekit.stats.ablation import METHODS

    check_early(device, max_memory, (("--max-tokens", max_tokens, 2), ("--seq-len", seq_len, 2),
                                     ("--batch-size", batch_size, 1)),
                (("--dtype", dtype, DTYPES), ("--ablation-method", ablation_method, METHODS)))
    fraction = parse_fraction(data_range)
    path = load_model_path(model, revision)
    check_context(path, ("--seq-len", seq_len, 512))
    sources = [DataSource.parse(v) for v in data] if data else None
    check_outputs(local_inputs(path, merge_with, tokenizer, data=data), out, overwrite,
                  {"--export-table": (export, TABLE_SUFFIXES),
                   "--export-coldest": (export_coldest, TABLE_SUFFIXES)})
    with TokenProgress() if is_writer() else nullcontext() as progress:
        result = profile_model(model, sources, tokenizer=tokenizer, text_field=text_field,
                               fraction=fraction, seq_len=seq_len, max_tokens=max_tokens,
                               batch_size=batch_size, device=device, dtype=dtype, trace=trace,
                               merge_with=merge_with, revision=revision, progress=progress,
                               max_memory=max_memory, trust_remote_code=trust_remote_code,
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


def show_profile(profile: Any, export: Path | None, export_coldest: Path | None) -> None:
    """Print the per-layer table, the coldest experts and the findings; export on request."""
    from moekit.stats.metrics import coldest, summary_table
    from moekit.stats.report import coldest_rich_table, findings, layer_rich_table

    console.print(layer_rich_table(profile))
    console.print(coldest_rich_table(profile))
    for line in findings(profile):
        console.print(f"- {line}")
    if export is not None:
        export_table(summary_table(profile), export)
    if export_coldest is not None:
        export_table(coldest(profile), export_coldest)


class TokenProgress:
    """A rich progress bar with tokens/s, fed by profile_model's progress callback (stderr)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("tokens"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=err_console, transient=True, disable=not err_console.is_terminal)
        self.task = self.progress.add_task("loading model and data", total=None, rate="")

    def __enter__(self) -> TokenProgress:
        self.progress.start()
        return self

    def __call__(self, event: str, tokens: int, domain: str) -> None:
        if event == "start":
            self.progress.update(self.task, total=tokens, description="profiling")
            return
        if event == "mode":
            self.progress.console.print(domain)
            return
        if event == "ablation":  # domain = "<method> <steps in all>"
            what, steps = domain.rsplit(" ", 1)
            self.progress.update(self.task, completed=tokens, total=int(steps),
                                 description=f"ablation ({what})", rate="")
            return
        self.progress.update(self.task, advance=tokens, description=f"profiling {domain}")
        speed = self.progress.tasks[0].speed
        if speed:
            self.progress.update(self.task, rate=f"{speed:,.0f} tok/s")

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
