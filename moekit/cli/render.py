"""Tables and summaries more than one command prints: the evaluation table (eval, and prune/
merge with --eval-data) and the profile summary (profile, stats show/merge)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.cli.common import console, export_table


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
