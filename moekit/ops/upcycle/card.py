"""Provenance record and model-card text for an upcycled checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import describe
from moekit.ops.upcycle.plan import UPCYCLE_TOKENS, UpcyclePlan

if TYPE_CHECKING:
    from moekit.ops.upcycle.types import Prepared, UpcycleReport

TRAINING_HINTS = """\
## Before use

Upcycled experts need continued training to diversify. Published recipes: reset the learning rate
to the pre-training peak with cosine decay, load-balancing loss 1e-2 to 1e-3, batch size at least
as large as in pre-training (He et al. 2024, arXiv 2410.07524). Drop-Upcycling pays off on long
training runs (hundreds of billions of tokens; Nakamura et al. 2025, arXiv 2502.19261).
"""


def provenance_details(plan: UpcyclePlan, prepared: Prepared,
                       report: UpcycleReport) -> dict[str, Any]:
    """Everything needed to reproduce the job (seeded), for moekit_provenance.json."""
    opts = plan.options
    details: dict[str, Any] = {
        "source_family": plan.dense.name,
        "source_fingerprint": model_fingerprint(plan.checkpoint, describe(plan.checkpoint)),
        "target_family": plan.family.name,
        "method": opts.method,
        "experts": opts.experts,
        "top_k": opts.top_k,
        "expert_width": plan.expert_width,
        "dense_width": plan.width,
        "shared_expert_width": plan.shared_width or 0,
        "norm_topk_prob": plan.renorm,
        "router_init": opts.router,
        "router_std": opts.router_std if opts.router == "random" else None,
        "seed": opts.seed,
        "routed_down_proj_scale": plan.routed_scale,
        "shared_down_proj_scale": plan.shared_scale if plan.shared_width else None,
        "shared_expert_gate": "zeros (sigmoid(0) = 0.5)" if plan.shared_width else None,
        "function_preserving": plan.preservation,
        "total_params": report.total_params,
        "active_params": report.active_params,
    }
    if opts.method == "split":
        details["split_order"] = opts.split_order
        details["neuron_map"] = "moekit_upcycle_neurons.json"
    if opts.method == "drop":
        details["drop_ratio"] = opts.drop_ratio
        details["drop_init"] = "N(mean, std) of the dense matrix; one neuron set per expert"
    if prepared.calibration is not None:
        start, end = opts.data.fraction
        details["calibration"] = {"tokens": prepared.calibration.tokens,
                                  "max_tokens": opts.data.total(UPCYCLE_TOKENS),
                                  "seq_len": opts.data.seq_len,
                                  "data_range": None if (start, end) == (0.0, 1.0)
                                  else f"{start:g}:{end:g}",
                                  "sources": prepared.calibration.sources}
    return {k: v for k, v in details.items() if v is not None}


def card_body(plan: UpcyclePlan, report: UpcycleReport,
              source_name: str) -> tuple[str, str, str]:
    """(title, summary, body) of the README."""
    opts = plan.options
    method = {"copy": "every expert is a copy of the dense FFN (sparse upcycling)",
              "split": f"the dense FFN's {plan.width} neurons are split into {opts.experts} "
                       f"experts of {plan.expert_width} ({opts.split_order} order)",
              "drop": f"copies of the dense FFN with {opts.drop_ratio:.0%} of each expert's "
                      "neurons re-initialised (Drop-Upcycling)"}[opts.method]
    title = f"{source_name} upcycled to {plan.family.architectures[0]}"
    summary = (f"A {opts.experts}-expert, top-{opts.top_k} {plan.family.name} MoE made from the "
               f"dense `{source_name}`: {method}.")
    rows = [("target", plan.family.architectures[0]),
            ("experts / top-k", f"{opts.experts} / {opts.top_k}"),
            ("expert width", str(plan.expert_width)),
            ("shared expert width", str(plan.shared_width or 0)),
            ("router init", opts.router + (f" (std {opts.router_std})"
                                           if opts.router == "random" else "")),
            ("seed", str(opts.seed)),
            ("total / active params", f"{report.total_params:,} / {report.active_params:,}"),
            ("equal to the dense model at init", plan.preservation)]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    return title, summary, f"{table}\n\n{TRAINING_HINTS}"
