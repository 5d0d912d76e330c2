"""Provenance record and model card of a merged checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from moekit.io.card import (
    eval_markdown,
    protected_markdown,
    provenance,
    write_model_card,
    write_provenance,
)
from moekit.ops.merge.plan import (
    GROUPINGS,
    LAYER_FITS,
    METHODS,
    ROUTERS,
    WRITTEN,
    MergePlan,
)


def merge_provenance(source: str, plan: MergePlan, *, config_keys: list[str],
                     warnings: list[str], stats_folder: str | None = None,
                     reconstruction: dict[int, float] | None = None) -> dict[str, Any]:
    """The JSON record: per layer the clusters (centre first), merge weights and which original
    expert went into which new id; grouping, method, router policy, statistics hash,
    calibration sample, config keys rewritten, warnings and the calibration output error."""
    layers = [{"layer": p.layer, "clusters": p.clusters, "weights": p.weights,
               "centres": p.centres, "folded": p.folded,
               "old_to_new": {str(j): i for i, c in enumerate(p.clusters) for j in c},
               "reconstruction_error": (reconstruction or {}).get(p.layer)}
              for p in plan.layers]
    return provenance(
        "merge", source, model_fingerprint=plan.model_fingerprint, family=plan.family,
        group=plan.group, group_formula=GROUPINGS[plan.group], method=plan.method,
        method_formula=METHODS[plan.method], router=plan.router,
        router_formula=ROUTERS[plan.router], centre_criterion=plan.criterion, ratio=plan.ratio,
        stats={"folder": stats_folder, "sha256": plan.stats_sha256},
        calibration=plan.calibration,
        experts_per_layer={"before": plan.num_experts, "after": plan.num_kept},
        top_k=plan.top_k, protected={str(k): v for k, v in plan.protected.items()},
        config_keys_changed=config_keys, config_changes=plan.config_changes,
        warnings=warnings, layers=layers)


def write_merge_records(folder: Path, source: str, plan: MergePlan, *, config_keys: list[str],
                        warnings: list[str], stats_folder: str | None = None,
                        reconstruction: dict[int, float] | None = None,
                        source_folder: Path | None = None,
                        evaluation: dict[str, Any] | None = None) -> None:
    """Write `moekit_provenance.json` and `README.md` into `folder`."""
    record = merge_provenance(source, plan, config_keys=config_keys, warnings=warnings,
                              stats_folder=stats_folder, reconstruction=reconstruction)
    write_provenance(folder, {**record, "evaluation": evaluation})
    name = Path(source).name if Path(source).exists() else source
    summary = (f"`{name}` with its {plan.num_experts} routed experts per MoE layer merged into "
               f"{plan.num_kept} in each of its {len(plan.layers)} MoE layers (top-k "
               f"{plan.top_k} unchanged). Grouping: **{plan.group}** "
               f"({GROUPINGS[plan.group]}); merging: **{plan.method}** ({METHODS[plan.method]}); "
               f"router rows: **{plan.router}** ({ROUTERS[plan.router]}). Shared experts and "
               "all non-expert weights are unchanged.")
    body = clusters_markdown(plan, reconstruction or {}) + protected_markdown(plan.protected,
                                                                             "merged")
    if warnings:
        body += "\n## Warnings\n\n" + "\n".join(f"- {w}" for w in warnings) + "\n"
    if evaluation:
        body += "\n" + eval_markdown(evaluation)
    write_model_card(folder, base_model=name, title=f"{Path(name).name} (merged, "
                     f"{plan.num_kept} experts per layer)", summary=summary,
                     tags=["merged", "moe", plan.family], body=body,
                     source_card=(source_folder / "README.md") if source_folder else None)


def clusters_markdown(plan: MergePlan, reconstruction: dict[int, float]) -> str:
    """Per layer: new expert id <- original ids (centre first) and the output error merge
    measured (`error_column`); no error column when it measured none."""
    header, cell, note = error_column(plan, reconstruction)
    lines = ["## What was merged", "", "| layer | new id <- original ids (centre first) | "
             f"kept alone: new <- original |{f' {header} |' if header else ''}",
             "|---|---|---|" + ("---|" if header else "")]
    for p in plan.layers:
        merged, alone = ("; ".join(f"{i} <- {' '.join(map(str, c))}"
                                   for i, c in enumerate(p.clusters) if (len(c) > 1) == many)
                         for many in (True, False))
        lines.append(f"| {p.layer} | {merged or '-'} | {alone or '-'} |"
                     + (f" {cell(p.layer)} |" if header else ""))
    lines += ["", f"Written: {WRITTEN[plan.method]}.{refit_outcome(plan)}", "",
              f"{note} The full map and merge weights are in `moekit_provenance.json`."]
    return "\n".join(lines) + "\n"


def error_column(plan: MergePlan, reconstruction: dict[int, float]
                 ) -> tuple[str, Callable[[int], str], str]:
    """(header, cell(layer), note) of the card's output-error column: `fit-layer` the
    refit's held-out layer errors (centres -> refitted), `fit`/`fit-centre` the relative error
    on the calibration tokens; header "" when merge measured no error (average, aligned)."""
    layers = ((plan.calibration or {}).get("refit") or {}).get("layers") or {}
    if plan.method in LAYER_FITS and layers:
        def refit_cell(layer: int) -> str:
            info = layers.get(str(layer))
            if not info:
                return "-"
            before, after = info["held_out_before"], info["held_out_after"]
            change = f" ({after / before - 1:+.0%})" if before > 0 else ""
            return f"{before:.4g} -> {after:.4g}{change}"

        return ("held-out output error: centres -> refitted", refit_cell,
                "The output error is the mean squared error per token of the layer's routed "
                "output against the unmerged layer's (plus the drift of the residual stream "
                "from the layers merged before it), on the held-out quarter of the layer's "
                "calibration tokens (never fitted on): with the centres alone, then with the "
                "refitted down projections.")
    if reconstruction:
        return ("calibration output error",
                lambda layer: ("-" if reconstruction.get(layer) is None
                               else f"{reconstruction[layer]:.2%}"),
                "The output error is the gate-weighted relative squared error of the merged "
                "experts against their clusters' outputs on the calibration tokens (fit only).")
    return ("", lambda layer: "",
            f"No output error was measured: `--method {plan.method}` merges the weights "
            "without calibration tokens (`moekit eval --ref` measures the merged model).")


def refit_outcome(plan: MergePlan) -> str:
    """`--method fit-layer`: whether the refitted down projections were written (the
    calibration record's `refit`), with the held-out KLs that decided it; else ""."""
    refit = (plan.calibration or {}).get("refit")
    if plan.method != "fit-layer" or not refit:
        return ""
    kl = refit.get("kl_held_out") or {}
    scores = (f" (held-out KL: centres {kl['centres']:.5f}, refitted {kl['refitted']:.5f})"
              if {"centres", "refitted"} <= set(kl) else "")
    if refit.get("kept"):
        return f" The refitted down projections were written{scores}."
    return (f" No refit was written{scores}: the new experts are the centres unchanged, i.e. "
            "the model pruned to the centres.")
