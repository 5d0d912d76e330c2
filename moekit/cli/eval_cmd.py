"""`moekit eval MODEL --data NAME=PATH ... [--ref ORIGINAL]`."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from moekit.cli.common import (
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    ModelArg,
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


@handle_errors
@distributed_command
def eval_model(
    model: ModelArg,
    data: DataOpt = None,
    data_range: RangeOpt = None,
    ref: Annotated[str | None, typer.Option(
        "--ref", help="Reference checkpoint (e.g. the unpruned source): adds KL(ref||model) "
        "and top-1 agreement on the same windows.")] = None,
    seq_len: SeqLenOpt = 512,
    max_tokens: Annotated[int, typer.Option("--max-tokens",
                                            help="At most this many tokens per dataset.")] = 32768,
    batch_size: BatchSizeOpt = 4,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_memory: MaxMemoryOpt = "auto",
    tokenizer: TokenizerOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    text_field: TextFieldOpt = "text",
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
    export: Annotated[Path | None, typer.Option(
        "--export", help="Also write the table as .csv/.parquet/.json.")] = None,
    generate: Annotated[str | None, typer.Option(
        "--generate", help="Prompts (a text file, one per line, or - for stdin): greedy "
        "continuations beside --ref's, the first differing token marked. Without --data, "
        "only this runs.")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", help="Tokens generated per prompt (--generate).")] = 32,
    generate_out: Annotated[Path | None, typer.Option(
        "--generate-out", help="Write the continuations as .md or .json.")] = None,
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="lm-evaluation-harness tasks (names, or a task's .yaml), comma-"
        "separated: scores beside --ref's. Without --data, only this runs. Needs "
        "pip install 'moekit[tasks]'.")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", help="--tasks: at most this many examples per task (quick checks).")] = None,
    include_path: Annotated[Path | None, typer.Option(
        "--include-path", help="--tasks: a folder of your own lm-eval task YAMLs.")] = None,
    tasks_out: Annotated[Path | None, typer.Option(
        "--tasks-out", help="--tasks: write the scores as .csv/.parquet/.json.")] = None,
) -> None:
    """Perplexity and mean token loss (nats) per dataset; with --ref, KL and top-1 agreement.

    Example: moekit eval ./pruned --data code=code.txt --data-range 0.5:1 --ref ./original

    Example: moekit eval ./pruned --ref ./original --generate prompts.txt --generate-out gen.md

    Example: moekit eval ./pruned --ref ./original --tasks ./my_task.yaml --limit 100

    Data-parallel: torchrun --nproc-per-node N -m moekit eval ... (docs/scale-distributed.md).
    """
    from moekit.calib.data import DataSource, default_sources, parse_fraction
    from moekit.io.output import TABLE_SUFFIXES, check_outputs
    from moekit.ops.evaluate import evaluate
    from moekit.runtime.loading import DTYPES

    check_early(device, max_memory, (("--max-tokens", max_tokens, 2), ("--seq-len", seq_len, 2),
                                     ("--batch-size", batch_size, 1)),
                (("--dtype", dtype, DTYPES),))
    fraction = parse_fraction(data_range)
    path = load_model_path(model, revision)
    ref_path = load_model_path(ref, revision) if ref else None
    for folder in (path, ref_path) if ref_path else (path,):
        check_context(folder, ("--seq-len", seq_len, 512))
    sources = [DataSource.parse(v) for v in data] if data else default_sources()
    check_outputs((*local_inputs(path, ref_path, tokenizer), *(s.path for s in sources)),
                  files={"--export": (export, TABLE_SUFFIXES),
                         "--generate-out": (generate_out, (".md", ".json")),
                         "--tasks-out": (tasks_out, TABLE_SUFFIXES)})
    if limit is not None and limit < 1:
        from moekit.errors import InvalidArgumentError

        raise InvalidArgumentError(f"--limit {limit} is below 1")
    if tasks is not None:
        from moekit.cli.tasks_view import run_task_table

        run_task_table(path, ref_path, tasks, tasks_out, limit=limit, include_path=include_path,
                       batch_size=batch_size, device=device, dtype=dtype, tokenizer=tokenizer,
                       trust_remote_code=trust_remote_code)
    if generate is not None:
        from moekit.cli.generate_view import run_generate

        run_generate(path, ref_path, generate, generate_out, max_new_tokens=max_new_tokens,
                     device=device, dtype=dtype, tokenizer=tokenizer,
                     trust_remote_code=trust_remote_code)
    if (generate is not None or tasks is not None) and not data:
        return
    with token_progress("evaluating") if is_writer() else nullcontext() as on_tokens:
        result = evaluate(path, sources, ref_path, seq_len=seq_len, max_tokens=max_tokens,
                          batch_size=batch_size, device=device, dtype=dtype, fraction=fraction,
                          tokenizer=tokenizer, text_field=text_field, on_tokens=on_tokens,
                          max_memory=max_memory, trust_remote_code=trust_remote_code)
    if not ready_to_write():  # under torchrun: every rank succeeded, and this is rank 0
        return
    for warning in result.settings.get("warnings", []):
        err_console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
    for who, info in result.settings.get("runtime", {}).items():
        err_console.print(f"{who}: {'streamed' if info['mode'] == 'stream' else 'in memory'} "
                          f"({info['reason']})", soft_wrap=True)
    if export is not None:
        import pandas as pd

        export_table(pd.DataFrame(eval_rows(result.to_dict())), export)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    console.print(eval_table(result.to_dict()))


def eval_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per dataset plus `overall`, for export."""
    return [dict(row) for row in [*result["domains"], result["overall"]]]


def eval_table(result: dict[str, Any]):  # noqa: ANN201 - rich Table
    """Loss and perplexity per dataset; with a reference also the reference's own loss and
    perplexity, the change (model ppl / ref ppl - 1), KL(ref||model) and top-1 agreement."""
    from rich import box
    from rich.table import Table

    from moekit.cli.heading import headed

    has_ref = result.get("ref") is not None
    title = f"{result['model']}" + (f" vs reference {result['ref']}" if has_ref else "")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                  caption="loss in nats per token; KL = KL(ref||model); Δ ppl = ppl / ref ppl - 1"
                  if has_ref else None, caption_justify="left")
    for name in ["data", "tokens", "loss", "ppl"] + (
            ["ref loss", "ref ppl", "Δ ppl", "KL", "top-1"] if has_ref else []):
        table.add_column(name, justify="left" if name == "data" else "right", no_wrap=True)
    rows = eval_rows(result)
    for i, row in enumerate(rows):
        cells = [row["name"], f"{row['tokens']:,}", f"{row['loss']:.4f}", f"{row['ppl']:.2f}"]
        if has_ref:
            cells += [_num(row.get("ref_loss"), ".4f"), _num(row.get("ref_ppl"), ".2f"),
                      _change(row["ppl"], row.get("ref_ppl")),
                      f"{nonnegative(row['kl']):.4f}", f"{row['top1']:.1%}"]
        table.add_row(*cells, style="bold" if i == len(rows) - 1 else None)
    return headed(table)


def nonnegative(value: float) -> float:
    """KL is >= 0; float round-off can give -1e-9, printed as `-0.0000`: show 0 instead."""
    return max(value, 0.0) + 0.0  # + 0.0 turns -0.0 into 0.0


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _change(value: float, ref: float | None) -> str:
    """Relative change of `value` against `ref`, e.g. `+12.3%` (`-` without a reference)."""
    return "-" if not ref else f"{value / ref - 1:+.1%}"


class token_progress:  # noqa: N801 - used like a function in `with`
    """A rich progress bar fed by `on_tokens(advance, total)` callbacks (stderr)."""

    def __init__(self, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        from moekit.cli.common import err_console

        self.progress = Progress("[progress.description]{task.description}", BarColumn(),
                                 MofNCompleteColumn(), "tokens", TimeElapsedColumn(),
                                 console=err_console, transient=True,
                                 disable=not err_console.is_terminal)
        self.label = label
        self.task = self.progress.add_task(f"{label} (loading model and data)", total=None)

    def __enter__(self):  # noqa: ANN204
        self.progress.start()
        return self.update

    def update(self, advance: int, total: int) -> None:
        label = self.label if advance else None  # tokens flow: loading is over
        self.progress.update(self.task, advance=advance, total=total, description=label)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
