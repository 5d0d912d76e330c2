"""Provenance record and model card of a pruned checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moekit.io.card import (
    eval_markdown,
    protected_markdown,
    provenance,
    write_model_card,
    write_provenance,
)
from moekit.stats.criteria import CRITERIA
from moekit.surgery.plan import PrunePlan


def prune_provenance(source: str, plan: PrunePlan, *, config_keys: list[str],
                     warnings: list[str], stats_folder: str | None = None,
                     budget: list[dict[str, Any]] | None = None,
                     evaluation: dict[str, Any] | None = None,
                     calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record: old-to-new expert ids per layer, criterion values, ratio, statistics
    hash, config keys rewritten, warnings, budget and eval numbers, and with --data the
    calibration record (data hash, candidates scored, modified tensors with relative change);
    command line and moekit version come from `provenance`."""
    layers = [{"layer": p.layer, "kept": p.kept, "dropped": p.dropped,
               "old_to_new": {str(k): v for k, v in p.old_to_new.items()},
               "criterion_values": p.scores} for p in plan.layers]
    return provenance(
        "prune", source, model_fingerprint=plan.model_fingerprint, family=plan.family,
        criterion=plan.criterion, criterion_formula=CRITERIA.get(plan.criterion, "explicit lists"),
        ratio=plan.ratio, seed=plan.seed, domain=plan.domain,
        stats={"folder": stats_folder, "sha256": plan.stats_sha256},
        experts_per_layer={"before": plan.num_experts, "after": plan.num_kept},
        top_k=plan.top_k, protected={str(k): v for k, v in plan.protected.items()},
        min_experts=plan.min_experts, config_keys_changed=config_keys,
        config_changes=plan.config_changes, warnings=warnings, budget=no_nan(budget),
        evaluation=evaluation, calibration=calibration, layers=layers)


def no_nan(rows: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """NaN (no statistics) as null, so the record stays strict JSON."""
    if rows is None:
        return None
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in rows]


def write_prune_records(folder: Path, source: str, plan: PrunePlan, *, config_keys: list[str],
                        warnings: list[str], stats_folder: str | None = None,
                        budget: list[dict[str, Any]] | None = None,
                        evaluation: dict[str, Any] | None = None,
                        source_folder: Path | None = None,
                        calibration: dict[str, Any] | None = None) -> None:
    """Write `moekit_provenance.json` and `README.md` into `folder`."""
    record = prune_provenance(source, plan, config_keys=config_keys, warnings=warnings,
                              stats_folder=stats_folder, budget=budget, evaluation=evaluation,
                              calibration=calibration)
    write_provenance(folder, record)
    name = Path(source).name if Path(source).exists() else source
    summary = (f"`{name}` with {plan.num_dropped} of {plan.num_experts} routed experts removed in "
               f"each of its {len(plan.layers)} MoE layers ({plan.num_kept} remain, top-k "
               f"{plan.top_k} unchanged), chosen by the **{plan.criterion}** criterion"
               + (f" on routing statistics of domain `{plan.domain}`" if plan.domain else "")
               + ". Shared experts and all non-expert weights are unchanged.")
    body = _budget_markdown(budget, plan) + protected_markdown(plan.protected, "removed",
                                                                  " and any given with --protect")
    if calibration:
        body += "\n" + _calibration_markdown(calibration)
    if warnings:
        body += "\n## Warnings\n\n" + "\n".join(f"- {w}" for w in warnings) + "\n"
    if evaluation:
        body += "\n" + eval_markdown(evaluation)
    write_model_card(folder, base_model=source, title=f"{Path(name).name} (pruned, "
                     f"{plan.num_kept} experts per layer)", summary=summary,
                     tags=["pruned", "moe", plan.family], body=body,
                     source_card=(source_folder / "README.md") if source_folder else None)


def _calibration_markdown(calibration: dict[str, Any]) -> str:
    lines = ["## Calibration", "", f"Chosen on data {calibration.get('data_hash')} "
             f"({', '.join(calibration.get('sources', {}))}). Candidates, scored by KL to the "
             "unpruned model on a held-out slice:", "", "| candidate | KL | top-1 | chosen |",
             "|---|---|---|---|"]
    for row in calibration.get("candidates", []):
        lines.append(f"| {row['candidate']} | {row['kl_held_out']:.5f} | "
                     f"{row['top1_held_out']:.2%} | {'yes' if row['chosen'] else ''} |")
    modified = calibration.get("modified_tensors") or []
    rebuilt = {(row["layer"], row["expert"]) for row in modified if row.get("reconstructed")}
    experts = sum(1 for row in modified if "expert" in row and not row.get("reconstructed"))
    routers = sum(1 for row in modified if "expert" not in row)
    if modified:
        whole = f" and the gate/up projections of {len(rebuilt)} (layer-wise reconstruction)" \
            if rebuilt else ""
        lines += ["", f"{experts} expert down projections{whole} and {routers} router "
                  "tensors were refitted on calibration activations; see "
                  "`moekit_provenance.json`."]
        stored = sorted({row["stored"] for row in modified
                         if str(row.get("stored", "")).startswith("re-encoded")})
        if stored:
            lines += ["", f"The refitted experts are quantized like the source: "
                      f"{', '.join(stored)} (new scales computed from the refitted values); "
                      "every other expert is copied as stored."]
    return "\n".join(lines) + "\n"


def _budget_markdown(budget: list[dict[str, Any]] | None, plan: PrunePlan) -> str:
    lines = ["## What was removed", "",
             "| layer | kept | removed expert ids | traffic removed | weight removed | "
             "saliency removed |", "|---|---|---|---|---|---|"]
    rows = budget or [{"layer": p.layer, "kept": len(p.kept),
                       "removed_ids": " ".join(map(str, p.dropped))} for p in plan.layers]
    for row in rows:
        cells = [_pct(row.get(k)) for k in ("traffic_removed", "weight_removed",
                                            "saliency_removed")]
        lines.append(f"| {row['layer']} | {row['kept']} | {row['removed_ids'] or '-'} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Shares are of the layer's routed tokens, gate-weight mass and criterion "
                 "saliency on the calibration data. The full old-to-new id map is in "
                 "`moekit_provenance.json`.")
    return "\n".join(lines) + "\n"


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1%}"
