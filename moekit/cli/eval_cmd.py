"""`moekit eval MODEL --data NAME=PATH ... [--ref ORIGINAL]`."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.common import (
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    MaxTokensOpt,
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
    run_data_options,
)
from moekit.cli.progress import token_progress
from moekit.cli.render import eval_rows, eval_table
from moekit.runtime.distributed import distributed_command, is_writer, ready_to_write


@handle_errors
@distributed_command
def eval_model(
    ctx: typer.Context,
    model: ModelArg,
    data: DataOpt = None,
    data_range: RangeOpt = None,
    ref: Annotated[str | None, typer.Option(
        "--ref", help="Reference checkpoint (e.g. the unpruned source): adds KL(ref||model) "
        "and top-1 agreement on the same windows.")] = None,
    seq_len: SeqLenOpt = 512,
    max_tokens: MaxTokensOpt = None,
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
    from moekit.io.output import TABLE_SUFFIXES, check_outputs
    from moekit.ops.evaluate import evaluate

    check_early(minimums=(("--batch-size", batch_size, 1),))
    run, spec = run_data_options(
        ctx, device=device, dtype=dtype, max_memory=max_memory,
        trust_remote_code=trust_remote_code, data=data, data_range=data_range,
        text_field=text_field, tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    path = load_model_path(model, revision)
    ref_path = load_model_path(ref, revision) if ref else None
    for folder in (path, ref_path) if ref_path else (path,):
        check_context(folder, ("--seq-len", seq_len, 512))
    sources = spec.resolved_sources()
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
                       batch_size=batch_size, run=run, tokenizer=tokenizer)
    if generate is not None:
        from moekit.cli.generate_view import run_generate

        run_generate(path, ref_path, generate, generate_out, max_new_tokens=max_new_tokens,
                     run=run, tokenizer=tokenizer)
    if (generate is not None or tasks is not None) and not data:
        return
    with token_progress("evaluating") if is_writer() else nullcontext() as on_tokens:
        result = evaluate(path, spec, ref_path, run=run, batch_size=batch_size,
                          on_tokens=on_tokens)
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
