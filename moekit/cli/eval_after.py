"""`--eval-data` of prune and merge: evaluate the written checkpoint against its source before
it is moved into place, and record the numbers in its provenance and model card."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

EvalDataOpt = Annotated[list[str] | None, typer.Option(
    "--eval-data", help="NAME=PATH: evaluate the result against the source (repeat).")]
EvalRangeOpt = Annotated[str | None, typer.Option("--eval-range",
                                                   help="START:END of eval data.")]
EvalMaxTokensOpt = Annotated[int, typer.Option(
    "--eval-max-tokens", help="--eval-data tokens read in total, an equal share from "
    "each dataset.")]
EvalSeqLenOpt = Annotated[int, typer.Option("--eval-seq-len",
                                            help="Tokens per --eval-data window.")]


def eval_options(values: list[str] | None, data_range: str | None, seq_len: int,
                 max_tokens: int, run: Any) -> dict[str, Any]:
    """Parse --eval-data early so a typo fails before any work: {"data": DataSpec, "run":
    RunOptions}. `run`: the command's `RunOptions`; the evaluation takes its device, memory
    budget and remote-code permission and runs in the checkpoints' own dtype."""
    from dataclasses import replace

    from moekit.calib.data import DataSource, parse_fraction
    from moekit.calib.spec import DataSpec
    from moekit.errors import DataError

    sources = tuple(DataSource.parse(v) for v in values or [])
    for source in sources:
        if not source.path.exists():
            raise DataError(f"--eval-data file {source.path} does not exist")
    return {"data": DataSpec(sources, parse_fraction(data_range), seq_len=seq_len,
                             max_tokens=max_tokens),
            "run": replace(run, dtype="auto")}


def evaluate_output(folder: Path, source: Path, out: Path, options: dict[str, Any],
                    what: str) -> dict[str, Any] | None:
    """The staged output `folder` against `source` on the --eval-data (None without)."""
    if not options["data"].sources:
        return None
    from moekit.cli.progress import token_progress
    from moekit.ops.evaluate import evaluate

    with token_progress(f"evaluating {what} vs source") as on_tokens:
        evaluation = evaluate(folder, options["data"], source, run=options["run"],
                              on_tokens=on_tokens).to_dict()
    evaluation["model"] = str(out)
    return evaluation
