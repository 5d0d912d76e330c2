"""`moekit eval --tasks`: run lm-eval through the library and show the scores."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moekit.cli.common import console, export_table
from moekit.cli.heading import headed

if TYPE_CHECKING:
    from moekit.runtime.options import RunOptions


def run_task_table(path: Path, ref: Path | None, tasks: str, out: Path | None, *,
                   limit: int | None, include_path: Path | None, batch_size: int,
                   run: RunOptions, tokenizer: str | None) -> None:
    """Scores per (task, metric): model, reference, Δ, stderr, retained %; `out` gets them."""
    import logging

    from rich import box
    from rich.table import Table

    from moekit.ops.tasks import run_tasks

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    rows = run_tasks(path, tasks, ref, limit=limit, include_path=include_path,
                     batch_size=batch_size, run=run, tokenizer=tokenizer)
    title = f"lm-eval tasks: {path}" + (f" vs {ref}" if ref else "") + (
        f" (--limit {limit})" if limit else "")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD,
                  caption="retained = model / reference" if ref else None,
                  caption_justify="left")
    columns = ["task", "metric", "model", "stderr"] + (["reference", "Δ", "retained"]
                                                       if ref else [])
    for name in columns:
        table.add_column(name, justify="left" if name in ("task", "metric") else "right")
    for row in rows:
        cells = [row.task, row.metric, f"{row.model:.4f}", _num(row.stderr)]
        if ref:
            cells += [_num(row.ref), _num(row.delta, "+.4f"),
                      "-" if row.retained is None else f"{row.retained:.1%}"]
        table.add_row(*cells)
    console.print(headed(table))
    if out is not None:
        import pandas as pd

        export_table(pd.DataFrame([r.to_dict() for r in rows]), out)


def _num(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)
