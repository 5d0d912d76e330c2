"""`moekit inspect MODEL`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moekit.cli.common import (
    JsonOpt,
    ModelArg,
    RevisionOpt,
    console,
    export_table,
    handle_errors,
    load_model_path,
)
from moekit.cli.heading import headed

if TYPE_CHECKING:
    from moekit.ops.inspect import InspectReport


@handle_errors
def inspect(model: ModelArg, revision: RevisionOpt = None, as_json: JsonOpt = False,
            export: Annotated[Path | None, typer.Option(
                "--export", help="Also write the facts as .csv/.parquet/.json.")] = None) -> None:
    """What a checkpoint is: family, MoE layers, experts, top-k, total vs active parameters.

    Reads config.json and safetensors headers only, so a 1 TB checkpoint inspects as fast as a
    1 MB one.

    Example: moekit inspect ./Mixtral-8x7B --json
    """
    from moekit.io.output import TABLE_SUFFIXES, check_outputs
    from moekit.ops.inspect import inspect_checkpoint

    path = load_model_path(model, revision)
    check_outputs((path,), files={"--export": (export, TABLE_SUFFIXES)})
    report = inspect_checkpoint(path)
    if export is not None:
        import pandas as pd

        row = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
               for k, v in report.to_dict().items()}
        export_table(pd.DataFrame([row]), export)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    console.print(headed(_table(report)))


def _table(report):  # noqa: ANN001, ANN202 - rich Table
    from rich.table import Table

    table = Table(title=f"{report.path}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [("family", f"{report.family} ({report.architecture})")]
    if report.is_moe:
        experts = sorted(set(report.experts_per_layer))
        rows += [
            ("layers", f"{report.num_layers} ({len(report.moe_layers)} MoE: "
                       f"{_ranges(report.moe_layers)})"),
            ("routed experts / layer", ", ".join(map(str, experts))),
            ("top-k", str(report.top_k)),
            ("shared experts", str(report.shared_experts)),
            ("expert width", str(report.expert_width or "?")),
            ("expert layout", report.expert_layout),
            ("router", report.router_scoring),
        ]
    else:
        rows += [("layers", f"{report.num_layers} (dense: no MoE layer)")]
    rows += [
        ("stored as", _stored(report)),
        ("on disk", f"{_bytes(report.bytes_on_disk)} in {report.num_shards} shard(s)"),
        ("total params", f"{report.total_params:,} ({_human(report.total_params)})"),
        ("active params / token", _active(report)),
        ("routed-expert params", f"{report.routed_expert_params:,}"),
    ]
    if report.mtp_layers:
        rows.append(("MTP layers (apart)", f"{_ranges(report.mtp_layers)}: "
                     f"{report.mtp_params:,} params ({_human(report.mtp_params)}), not run by "
                     "transformers, dropped by prune/merge"))
    for field, value in rows:
        table.add_row(field, value)
    return table


def _active(report: InspectReport) -> str:
    """Active parameters, and without the embedding rows a token does not read when that
    differs (the count OpenAI publishes for gpt-oss)."""
    text = f"{report.active_params:,} ({_human(report.active_params)})"
    if report.active_params_no_embedding != report.active_params:
        text += f"; {_human(report.active_params_no_embedding)} without the embedding table"
    return text


def _stored(report: InspectReport) -> str:
    """Share of the logical parameters per stored format, e.g. `mxfp4 63% (quant_method
    mxfp4), BF16 37%`."""
    whole = max(sum(report.dtypes.values()), 1)
    parts = [f"{k} {v / whole:.0%}" for k, v in report.dtypes.items()]
    method = f" (quant_method {report.quant_method})" if report.quant_method else ""
    return ", ".join(parts) + method


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else str(int(n))
        n /= 1000
    return f"{n:.1f}P"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"
