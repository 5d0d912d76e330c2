"""Metrics derived from the mergeable sums of a profile (formulas in docs/profile.md).

Notation per layer and domain: E experts, T tokens, L_e routed slots of expert e,
S = sum_e L_e = T * k slots, mean load L_bar = S / E, relative load r_e = L_e / L_bar
(1 = fair share). `share` has one meaning in every table, file and plot (SHARE): the share of
the layer's routed slots s_e = L_e / S (sums to 1 over the layer's experts; uniform 1 / E).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from moekit.stats.uncertainty import dead_and_unseen

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from moekit.stats.profile import Profile

SHARE = "share of the layer's routed slots, L_e / S (uniform 1/E)"
SHARE_HEADER = "slot share"  # the printed name of the `share` column, in every table
COLD_RATIO = 0.25  # an expert is cold when it gets less than a quarter of its fair share
COVERAGE = 0.9
LAYER_COLUMNS = ["layer", "domain", "tokens", "slots", "num_experts", "top_k", "entropy_sum",
                 "entropy_mean", "entropy_norm", "maxvio", "cv", "dead_experts", "cold_experts",
                 "coverage90", "load_entropy_norm", "top1_pairs", "top1_repeats", "top1_reuse",
                 "top1_reuse_uniform", "expected_per_expert"]


def load_metrics(loads: np.ndarray) -> dict[str, Any]:
    """Balance of one load vector L [E]: MaxVio = max L / L_bar - 1, CV = std(L) / L_bar
    (population std), dead = #{L_e = 0}, cold = #{0 < r_e < COLD_RATIO}, coverage90 = fewest
    experts holding 90% of the slots, load entropy H(L / S) / ln E."""
    import numpy as np

    num_experts = int(loads.size)
    slots = int(loads.sum())
    out: dict[str, Any] = {"slots": slots, "num_experts": num_experts,
                           "dead_experts": int((loads == 0).sum())}
    if slots == 0 or num_experts == 0:
        nan = float("nan")
        return out | {"maxvio": nan, "cv": nan, "cold_experts": 0, "coverage90": 0,
                      "load_entropy_norm": nan, "expected_per_expert": 0.0}
    mean = slots / num_experts
    share = np.sort(loads)[::-1] / slots
    nonzero = share[share > 0]
    load_entropy = float(-(nonzero * np.log(nonzero)).sum())
    return out | {
        "maxvio": float(loads.max() / mean - 1), "cv": float(loads.std() / mean),
        "cold_experts": int(((loads > 0) & (loads < COLD_RATIO * mean)).sum()),
        "coverage90": int(np.searchsorted(np.cumsum(share), COVERAGE - 1e-12) + 1),
        "load_entropy_norm": load_entropy / math.log(num_experts) if num_experts > 1 else 1.0,
        "expected_per_expert": float(mean)}


def layer_table(experts: pd.DataFrame, layer_raw: pd.DataFrame,
                order: dict[str, int] | None = None) -> pd.DataFrame:
    """layer_stats: the raw sums of `layer_raw` plus derived columns per (layer, domain).
    entropy_mean = entropy_sum / T (nats), entropy_norm = entropy_mean / ln E,
    top1_reuse = top1_repeats / top1_pairs (uniform random routing: 1 / E), top_k = S / T."""
    import numpy as np
    import pandas as pd

    loads = {key: group.sort_values("expert")["tokens"].to_numpy()
             for key, group in experts.groupby(["layer", "domain"], sort=False)}
    rows = []
    for raw in layer_raw.to_dict("records"):
        metrics = load_metrics(loads.get((raw["layer"], raw["domain"]), np.zeros(0, np.int64)))
        tokens, num_experts = int(raw["tokens"]), metrics["num_experts"]
        entropy_mean = raw["entropy_sum"] / tokens if tokens else float("nan")
        rows.append(raw | metrics | {
            "top_k": metrics["slots"] / tokens if tokens else float("nan"),
            "entropy_mean": entropy_mean,
            "entropy_norm": entropy_mean / math.log(num_experts) if num_experts > 1 else 0.0,
            "top1_reuse": (raw["top1_repeats"] / raw["top1_pairs"] if raw["top1_pairs"]
                           else float("nan")),
            "top1_reuse_uniform": 1 / num_experts if num_experts else float("nan")})
    frame = pd.DataFrame(rows, columns=LAYER_COLUMNS)
    if order:
        frame = frame.assign(_d=frame["domain"].map(order)).sort_values(
            ["layer", "_d"]).drop(columns="_d")
    for column in ("layer", "tokens", "slots", "num_experts", "top1_pairs", "top1_repeats",
                   "dead_experts", "cold_experts", "coverage90"):
        frame[column] = frame[column].astype("int64")
    return frame.reset_index(drop=True)


def expert_table(profile: Profile, domain: str = "all") -> pd.DataFrame:
    """Per (layer, expert) of one domain: share s_e = L_e / S, relative load r_e = L_e / L_bar,
    mean weight, EAN mean = ean_sum / L_e, REAP = reap_sum / L_e, max norm."""
    import numpy as np

    frame = profile.expert_stats
    frame = frame[frame["domain"] == domain].copy()
    layers = profile.layer_stats
    layers = layers[layers["domain"] == domain].set_index("layer")
    slots = frame["layer"].map(layers["slots"]).to_numpy(dtype=float)
    experts = frame["layer"].map(layers["num_experts"]).to_numpy(dtype=float)
    count = frame["tokens"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["share"] = count / slots
        frame["relative_load"] = count * experts / slots
        frame["weight_mean"] = frame["weight_sum"] / count
        frame["ean_mean"] = frame["ean_sum"] / count
        frame["reap"] = frame["reap_sum"] / count
    return frame.reset_index(drop=True)


def specialisation(profile: Profile) -> pd.DataFrame:
    """OLMoE-style domain specialisation per (layer, domain, expert): share = L_{e,D} / S_D
    (of the domain's routed slots) and relative = share / (1 / E) = L_{e,D} / (S_D / E); 1 = the
    uniform share (OLMoE's L_{e,D} / T_D over k / E is the same relative)."""
    import pandas as pd

    parts = [expert_table(profile, name).assign(domain=name) for name in profile.domains]
    if not parts:
        return pd.DataFrame(columns=["layer", "domain", "expert", "tokens", "share", "relative"])
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.rename(columns={"relative_load": "relative"})
    return frame[["layer", "domain", "expert", "tokens", "share", "relative"]]


def coldest(profile: Profile, count: int = 10) -> pd.DataFrame:
    """The `count` experts with the lowest relative load over all domains (ties: lower REAP)."""
    frame = expert_table(profile)
    frame = frame.sort_values(["relative_load", "reap_sum", "layer", "expert"])
    columns = ["layer", "expert", "tokens", "share", "relative_load", "weight_mean", "ean_mean",
               "reap", "max_norm"]
    return frame[columns].head(count).reset_index(drop=True)


def summary_table(profile: Profile, domain: str = "all") -> pd.DataFrame:
    """The per-layer summary printed by `moekit profile`: max_load = max r_e = 1 + MaxVio,
    min_load = min r_e; dead / unseen: experts with no token whose 95% upper bound on the share
    is / is not under DEAD_FRACTION of the fair share (`uncertainty.dead_and_unseen`)."""
    layers = profile.layer_stats
    frame = layers[layers["domain"] == domain].copy()

    counts = {layer: group["tokens"].to_numpy() for layer, group in profile.expert_stats[
        profile.expert_stats["domain"] == domain].groupby("layer")}
    frame["max_load"] = frame["maxvio"] + 1
    frame["min_load"] = [float(counts[layer].min()) / mean if mean and layer in counts
                         else float("nan") for layer, mean
                         in zip(frame["layer"], frame["expected_per_expert"], strict=True)]
    dead = [dead_and_unseen(counts[layer]) if layer in counts else (0, 0)
            for layer in frame["layer"]]
    frame["dead_experts"] = [d for d, _ in dead]
    frame["unseen_experts"] = [u for _, u in dead]
    columns = ["layer", "tokens", "num_experts", "dead_experts", "unseen_experts",
               "cold_experts", "max_load", "min_load", "maxvio", "cv", "entropy_norm",
               "coverage90", "top1_reuse"]
    return frame[columns].reset_index(drop=True)


def conditional_coactivation(counts: np.ndarray) -> np.ndarray:
    """A_ij = N(i, j) / N(i): the share of expert i's tokens that also pick expert j."""
    import numpy as np

    diag = np.diag(counts).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = counts / diag[:, None]
    return np.nan_to_num(out)
