"""`moekit stats merge|show|export|import|uncertainty`: work with saved profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moekit.cli.common import (
    ColdestOpt,
    ExportOpt,
    OldExportTableOpt,
    OutOpt,
    OverwriteOpt,
    PlotLayerOpt,
    PlotsOpt,
    console,
    err_console,
    handle_errors,
    renamed,
)
from moekit.cli.render import show_profile

stats_app = typer.Typer(name="stats", no_args_is_help=True,
                        help="Work with saved routing profiles (moekit profile --out).")

ProfilesArg = Annotated[list[Path], typer.Argument(help="Profile folders of the same model.")]


@stats_app.command("merge")
@handle_errors
def merge(
    profiles: ProfilesArg,
    out: OutOpt,
    overwrite: OverwriteOpt = False,
    plots: PlotsOpt = True,
    plot_layer: PlotLayerOpt = None,
    export: ExportOpt = None,
    export_coldest: ColdestOpt = None,
    old_export: OldExportTableOpt = None,
    allow_duplicates: Annotated[bool, typer.Option(
        "--allow-duplicates", help="Merge even when inputs hold the same data (its counts then "
        "add twice); refused by default.")] = False,
) -> None:
    """Add profiles of the same model (e.g. datasets profiled separately or on several
    machines): counts and sums add exactly, max_norm takes the max, same-named domains add up.

    Example: moekit stats merge prof-code prof-chat --out prof-all
    """
    from moekit.io.output import TABLE_SUFFIXES, check_outputs
    from moekit.ops.profile import write_output
    from moekit.stats.profile_io import load_profile, merge_profiles

    export = renamed(export, old_export, "--export-table")
    check_outputs(profiles, out, overwrite, {"--export": (export, TABLE_SUFFIXES),
                                             "--export-coldest": (export_coldest, TABLE_SUFFIXES)})
    merged = merge_profiles([load_profile(p) for p in profiles], allow_duplicates)
    for line in merged.metadata.get("duplicates", []):
        err_console.print(f"[bold yellow]warning:[/] {line}: counted twice (--allow-duplicates)",
                          soft_wrap=True)
    names = write_output(merged, out, overwrite=overwrite, inputs=tuple(profiles), plots=plots,
                         plot_layer=plot_layer)
    show_profile(merged, export, export_coldest)
    console.print(f"wrote {out}: {', '.join(names)}")


@stats_app.command("show")
@handle_errors
def show(
    profile: Annotated[Path, typer.Argument(help="A profile folder.")],
    export: ExportOpt = None,
    export_coldest: ColdestOpt = None,
    old_export: OldExportTableOpt = None,
) -> None:
    """Print a saved profile's per-layer table, coldest experts and findings.

    Example: moekit stats show prof --export layers.csv
    """
    from moekit.io.output import TABLE_SUFFIXES, check_outputs
    from moekit.stats.profile_io import load_profile

    export = renamed(export, old_export, "--export-table")
    check_outputs((profile,), files={"--export": (export, TABLE_SUFFIXES),
                                     "--export-coldest": (export_coldest, TABLE_SUFFIXES)})
    show_profile(load_profile(profile), export, export_coldest)


@stats_app.command("export")
@handle_errors
def export(
    profile: Annotated[Path, typer.Argument(help="A profile folder.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="Serving engine: vllm (safetensors "
                                     "global_expert_load_window) or sglang (.json/.pt "
                                     "logical_count).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file.")],
    domain: Annotated[str, typer.Option("--domain", help="Domain whose loads to write.")] = "all",
) -> None:
    """Write measured per-layer expert loads for an expert-parallel load balancer
    (see docs/serving.md).

    Example: moekit stats export prof --format sglang --out loads.json
    """
    from moekit.io.output import check_outputs
    from moekit.stats.profile_io import load_profile
    from moekit.stats.serving import FORMATS, export_loads

    suffixes = FORMATS.get(fmt, (".safetensors", ".json", ".pt"))
    check_outputs((profile,), files={"--out": (out, suffixes)})
    path = export_loads(load_profile(profile), fmt, out, domain)
    console.print(f"wrote {path} ({fmt} expert loads, domain {domain})")


@stats_app.command("import")
@handle_errors
def import_loads(
    dump: Annotated[Path, typer.Argument(help="An SGLang (.json/.pt logical_count) or vLLM "
                                         "(.safetensors global_expert_load_window) load dump.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="Serving engine: sglang or vllm.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="The checkpoint folder the dump "
                                        "was recorded on (headers and routers are read).")],
    out: OutOpt,
    domain: Annotated[str, typer.Option("--domain", help="Name of the imported traffic in the "
                                        "profile.")] = "serving",
    overwrite: OverwriteOpt = False,
    plots: PlotsOpt = True,
) -> None:
    """Turn a serving engine's expert-load dump into a profile folder (usage counts only), so
    `moekit prune --stats OUT --criterion frequency` and `stats merge` work on production traffic.

    Example: moekit stats import loads.json --format sglang --model ./my-moe --out prof-serving
    """
    from moekit.cli.common import moe_layout
    from moekit.io.output import check_outputs
    from moekit.ops.profile import write_output
    from moekit.stats.serving_import import moe_rows, profile_from_loads, read_loads

    check_outputs((dump, model), out, overwrite)
    counts = read_loads(dump, fmt)
    _, layout, fingerprint = moe_layout(model)
    loads = moe_rows(counts, fmt, layout, dump.name)
    profile = profile_from_loads(loads, layout, fingerprint, fmt=fmt, source=dump, domain=domain)
    names = write_output(profile, out, overwrite=overwrite, inputs=(dump, model), plots=plots)
    console.print(f"wrote {out}: {', '.join(names)} (usage counts only: prune with "
                  "--criterion frequency)")


UNCERTAINTY_CAPTION = (
    "Pruning {ratio:.0%} of each layer's experts by {criterion}. slots: routed slots (tokens x "
    "top-k) seen; unstable: experts whose keep/drop decision flips in more than 5% of the "
    "resamples; growth: how many times the calibration data must grow for every decision of "
    "the layer to settle (1.00x: already stable); more_slots: the routed slots to add for "
    "that, (growth - 1) x slots, rounded up.")


@stats_app.command("uncertainty")
@handle_errors
def uncertainty(
    profile: Annotated[Path, typer.Argument(help="A profile folder (with windows.npz).")],
    ratio: Annotated[float, typer.Option("--ratio", help="Share of each layer's experts a "
                                         "prune would drop.")] = 0.25,
    criterion: Annotated[str, typer.Option(
        "--criterion", help="ean (the prune default), frequency, reap, reap-sum, weight or man.")
    ] = "ean",
    domain: Annotated[str, typer.Option("--domain", help="Domain to resample.")] = "all",
    replicates: Annotated[int, typer.Option("--replicates", min=100,
                                            help="Bootstrap replicates.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (results repeat).")] = 0,
    export: Annotated[Path | None, typer.Option("--export", help="Write the per-expert "
                                                "intervals (.csv/.parquet/.json).")] = None,
    old_export: OldExportTableOpt = None,
) -> None:
    """Bootstrap 95% intervals over calibration windows: per-expert usage share and criterion,
    how often each expert would be dropped, unstable decisions, tokens needed to settle them.

    Example: moekit stats uncertainty prof --ratio 0.5 --criterion reap --export ci.csv
    (default: ean, the criterion prune uses by default)
    """
    from moekit.cli.common import export_table
    from moekit.io.output import TABLE_SUFFIXES, check_outputs
    from moekit.stats.profile_io import load_profile
    from moekit.stats.report import markdown_table
    from moekit.stats.uncertainty import profile_uncertainty

    export = renamed(export, old_export, "--export-table")
    check_outputs((profile,), files={"--export": (export, TABLE_SUFFIXES)})
    experts, layers = profile_uncertainty(load_profile(profile), ratio=ratio,
                                          criterion=criterion, domain=domain,
                                          replicates=replicates, seed=seed)
    shown = layers.assign(
        growth=[f"{g:.2f}x" if g < float("inf") else "inf" for g in layers["growth"]],
        more_slots=["never (a tie at the cut)" if n is None or n != n else f"{int(n):,}"
                    for n in layers["more_slots"]])
    console.print(markdown_table(shown), soft_wrap=True)
    console.print(UNCERTAINTY_CAPTION.format(ratio=ratio, criterion=criterion), soft_wrap=True)
    if export is not None:
        export_table(experts, export)
        console.print(f"wrote {export}")
