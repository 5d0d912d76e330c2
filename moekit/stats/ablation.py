"""Ablation importance as profile columns, its plot and its report section.

Columns of `expert_stats` (per layer, expert, domain; `all` = every domain of the sample):

- `ablation_tokens`: predicted positions in the ablation sample (S-1 per window);
- `ablation_loss`: mean change of the next-token NLL (nats) when the expert is removed from
  that layer's routing: (1/N) sum_t [-log q(x_t+1) + log p(x_t+1)], p unablated, q ablated;
- `ablation_kl`: mean KL(p || q) (nats);
- `ablation_loss_fo`: the first-order estimate of `ablation_loss` (see ops/ablation).

Means weighted by `ablation_tokens`, so `stats merge` averages them exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.stats.plots import DPI
from moekit.stats.profile_io import ABLATION_COLUMNS, ALL

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from moekit.stats.profile import Profile

PLOT_FILE = "ablation_scatter.png"
METHODS = ("both", "exact", "first-order")  # --ablation-method


@dataclass
class AblationSums:
    """Sums over the sample: `loss[l]`, `kl[l]`, `first_order[l]` are [E, D] float64 arrays
    (D domains) for MoE layer l; `tokens` [D] counts the predicted positions; `base_loss` [D]
    sums the unablated NLL; `group_lift[l]` [D] (group-limited routers, exact method) sums the
    NLL change of routing plain top-k with no expert removed, part of every `loss[l]`."""

    layers: list[int]
    domains: list[str]
    tokens: np.ndarray
    base_loss: np.ndarray
    loss: dict[int, np.ndarray] = field(default_factory=dict)
    kl: dict[int, np.ndarray] = field(default_factory=dict)
    first_order: dict[int, np.ndarray] = field(default_factory=dict)
    group_lift: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def ablation_frame(sums: AblationSums) -> pd.DataFrame:
    """Rows (layer, expert, domain, ablation columns) for every domain and `all`."""
    import numpy as np
    import pandas as pd

    rows = []
    names = [*sums.domains, ALL]
    for layer in sums.layers:
        parts = {key: getattr(sums, attr).get(layer) for key, attr in
                 (("ablation_loss", "loss"), ("ablation_kl", "kl"),
                  ("ablation_loss_fo", "first_order"))}
        width = next(v.shape[0] for v in parts.values() if v is not None)
        for d, name in enumerate(names):
            tokens = int(sums.tokens.sum() if name == ALL else sums.tokens[d])
            row = {"layer": layer, "expert": np.arange(width), "domain": name,
                   "ablation_tokens": tokens}
            for key, value in parts.items():
                total = value.sum(axis=1) if value is not None and name == ALL else \
                    value[:, d] if value is not None else np.full(width, np.nan)
                row[key] = total / tokens if tokens else np.nan
            rows.append(pd.DataFrame(row))
    return pd.concat(rows, ignore_index=True)


def attach(profile: Profile, frame: pd.DataFrame, info: dict[str, Any]) -> Profile:
    """`profile` with the ablation columns joined to `expert_stats` (by layer, expert, domain)
    and `metadata["ablation"] = info`."""
    keys = ["layer", "expert", "domain"]
    base = profile.expert_stats.drop(columns=[c for c in ABLATION_COLUMNS
                                              if c in profile.expert_stats.columns])
    merged = base.merge(frame, on=keys, how="left")
    merged["ablation_tokens"] = merged["ablation_tokens"].fillna(0).astype("int64")
    profile.expert_stats = merged
    profile.metadata["ablation"] = info
    return profile


def has_ablation(profile: Profile, column: str = "ablation_loss") -> bool:
    frame = profile.expert_stats
    return column in frame.columns and bool(frame[column].notna().any())


def ablation_table(profile: Profile) -> pd.DataFrame:
    """Domain `all` per expert: usage share of the layer's routed slots next to the ablation
    columns."""
    frame = profile.expert_stats
    rows = frame[frame["domain"] == ALL].copy()
    slots = rows.groupby("layer")["tokens"].transform("sum").clip(lower=1)
    rows["usage"] = rows["tokens"] / slots
    columns = ["layer", "expert", "usage", *[c for c in ABLATION_COLUMNS if c in rows]]
    return rows[columns].reset_index(drop=True)


def scatter_plot(profile: Profile, path: Path) -> None:
    """Usage share (x) against ablation loss change (y), one colour per MoE layer."""
    import matplotlib.pyplot as plt
    import numpy as np

    table = ablation_table(profile)
    layers = profile.moe_layers
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=DPI)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(layers)))
    for colour, layer in zip(colours, layers, strict=True):
        rows = table[table["layer"] == layer]
        ax.scatter(rows["usage"], rows["ablation_loss"], s=14, color=colour,
                   label=f"layer {layer}" if len(layers) <= 12 else None)
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    tokens = int(table["ablation_tokens"].max()) if len(table) else 0
    ax.set_xlabel("usage: share of the layer's routed slots")
    ax.set_ylabel("ablation: mean NLL change (nats/token)")
    name = Path(str(profile.metadata.get("model", "model"))).name
    ax.set_title(f"Usage vs ablation importance: {name}\n"
                 f"each point one expert removed from one layer ({tokens:,} predicted tokens)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if len(layers) <= 12:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report_lines(profile: Profile, plots: dict[str, str], markdown: Callable[..., str],
                 shown: int = 10) -> list[str]:
    """report.md section: method, agreement of usage and first-order with the exact values,
    the experts whose removal costs most (`markdown(frame, fmt)` renders it), and the plot.
    Empty without ablation columns."""
    if not has_ablation(profile):
        return []
    table = ablation_table(profile)
    info = profile.metadata.get("ablation", {})
    corr = table[["usage", "ablation_loss"]].corr("spearman").iloc[0, 1]
    lines = ["## Ablation importance", "",
             f"Each expert removed from one layer's routing at a time (the router re-routes its "
             f"tokens among the others), on {int(table['ablation_tokens'].max()):,} predicted "
             f"tokens; `ablation_loss` = mean NLL change, `ablation_kl` = mean KL(unablated || "
             f"ablated), in nats. Method: {info.get('method', '?')}. Spearman correlation of "
             f"usage with ablation_loss: {corr:.2f}."]
    if "ablation_loss_fo" in table and table["ablation_loss_fo"].notna().any():
        fo = table[["ablation_loss", "ablation_loss_fo"]].corr().iloc[0, 1]
        lines[-1] += f" Pearson correlation of the first-order estimate with it: {fo:.3f}."
    lift = info.get("group_lift_loss") or {}
    if lift:
        lines[-1] += (" Grouped routing: the ablated layer routes plain top-k; that alone changes "
                      "the loss by " + ", ".join(f"{v:+.4f} (layer {k})" for k, v in lift.items())
                      + ", included in every expert's value.")
    top = table.sort_values("ablation_loss", ascending=False).head(shown)
    lines += ["", "Experts whose removal costs most:", "", markdown(top, "{:.4g}"), ""]
    if "ablation" in plots:
        lines += [f"![Usage vs ablation importance]({plots['ablation']})", ""]
    return lines
