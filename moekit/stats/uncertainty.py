"""How sure are we? Bootstrap intervals over calibration windows, and the stability of pruning.

Data: per MoE layer, the per-window sums of the profile (`windows.npz`): `N[w, e]` routed slots
and `R[w, e]` REAP numerators of expert e in window w (W windows; domain `all` = the windows of
every domain). Windows are the resampling unit: tokens inside a window are not independent.

One bootstrap replicate b draws W windows with replacement, i.e. multiplicities
`m_b ~ Multinomial(W, 1/W)`, and recomputes from `n_b = m_b N` and `r_b = m_b R` ([E] each):

    usage share   s_e = n_e / sum_j n_j                 (share of routed slots; uniform 1/E)
    REAP score    a_e = r_e / n_e                        (0 when n_e = 0)

The interval is the *expanded* percentile interval over B replicates (see `expanded_tail`:
the plain percentile interval covers 93% instead of 95% with 20-40 windows).
Pruning decision for ratio rho and criterion c ("frequency" = s, "reap" = a, "man" = EAN / n;
"ean", "weight", "reap-sum" = the window sums of ean_sum, weight_sum, reap_sum): drop the
`n_drop = round(rho E)` lowest scores; `drop_freq_e` = share of replicates in which e is dropped.
An expert's decision is *unstable* when min(drop_freq, 1 - drop_freq) > `UNSTABLE` (5%).

More tokens needed: interval half-widths shrink as 1/sqrt(tokens); an unstable expert at distance
g_e from the cut (midway between the n_drop-th and next point score) with half-width h_e is
stable once tokens grow by the factor (h_e / g_e)^2; the layer needs the largest factor.

"Dead": zero observed slots AND an upper bound on s_e below `DEAD_FRACTION` of the uniform
share, the bound being the larger of the bootstrap upper limit (0 here) and the Clopper-Pearson
upper limit for 0 of n slots, 1 - ((1-level)/2)^(1/n) ~ 3.7/n. Otherwise only "unseen".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moekit.errors import StatsError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from moekit.stats.profile import Profile

UNSTABLE = 0.05
DEAD_FRACTION = 0.05
CRITERIA = ("ean", "frequency", "reap", "reap-sum", "weight", "man")  # the default first
_EXTRA = {"ean": "ean_sum", "man": "ean_sum", "weight": "weight_sum"}  # per-window columns


def windows_of(profile: Profile, layer: int, domain: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Per-window slots N [W, E] (int64) and REAP sums R [W, E] (float64) of one layer."""
    import numpy as np

    if not profile.windows:
        raise StatsError("the profile has no per-window counts (windows.npz)",
                         "re-run moekit profile with this moekit version")
    names = profile.domains if domain == "all" else [domain]
    keys = [f"{name}/{layer}/tokens" for name in names]
    if any(k not in profile.windows for k in keys):
        raise StatsError(f"no per-window counts for layer {layer}, domain {domain}",
                         f"choose a layer of {profile.moe_layers} and a domain of "
                         f"{['all', *profile.domains]}")
    tokens = np.concatenate([profile.windows[k] for k in keys]).astype(np.int64)
    reap = np.concatenate([profile.windows[k[:-len('tokens')] + "reap_sum"]
                           for k in keys]).astype(np.float64)
    return tokens, reap


def extra_windows(profile: Profile, layer: int, domain: str, criterion: str
                  ) -> dict[str, np.ndarray]:
    """The per-window column [W, E] `criterion` needs beyond slots and REAP ({} for none)."""
    import numpy as np

    check_criterion(criterion)
    column = _EXTRA.get(criterion)
    if column is None:
        return {}
    names = profile.domains if domain == "all" else [domain]
    keys = [f"{name}/{layer}/{column}" for name in names]
    if any(k not in profile.windows for k in keys):
        raise StatsError(f"the profile has no per-window {column} (written by an older moekit)",
                         "re-run moekit profile, or use --criterion frequency or reap")
    return {column: np.concatenate([profile.windows[k] for k in keys]).astype(np.float64)}


def criterion_column(criterion: str) -> str:
    """The per-window column `criterion` reads (tokens for frequency, reap_sum for REAP)."""
    return _EXTRA.get(criterion, "tokens" if criterion == "frequency" else "reap_sum")


def check_criterion(criterion: str) -> None:
    """A criterion with per-window values; ablation is measured once, not per window."""
    if criterion not in CRITERIA:
        raise StatsError(f"criterion '{criterion}' has no per-window values to resample",
                         f"choose one of {', '.join(CRITERIA)}")


def multiplicities(num_windows: int, replicates: int, seed: int) -> np.ndarray:
    """[B, W] window multiplicities of B bootstrap replicates (rows sum to W)."""
    import numpy as np

    if num_windows < 2:
        raise StatsError(f"{num_windows} calibration window(s): too few to resample",
                         "profile more windows (more text or a shorter --seq-len)")
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_windows, np.full(num_windows, 1.0 / num_windows), size=replicates)


def scores(tokens: np.ndarray, reap: np.ndarray, criterion: str,
           extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Criterion values from summed slots/REAP (and `extra` weight/EAN sums), any leading
    shape [..., E]; as `stats.criteria` ranks them (frequency as the share of slots)."""
    import numpy as np

    check_criterion(criterion)
    extra = extra or {}
    if criterion == "frequency":
        total = tokens.sum(axis=-1, keepdims=True)
        return tokens / np.maximum(total, 1)
    if criterion in ("reap", "man"):
        summed = reap if criterion == "reap" else extra["ean_sum"]
        return np.where(tokens > 0, summed / np.maximum(tokens, 1), 0.0)
    return reap if criterion == "reap-sum" else extra[_EXTRA[criterion]]


def student_t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with df degrees of freedom, Cornish-Fisher series in 1/df
    (Abramowitz & Stegun 26.7.5; error < 1e-3 for df >= 3 at p = 0.975)."""
    from statistics import NormalDist

    z, v = NormalDist().inv_cdf(p), float(max(df, 1))
    terms = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(term / v ** (i + 1) for i, term in enumerate(terms))


def expanded_tail(level: float, num_windows: int) -> float:
    """Lower tail probability of the expanded percentile interval (Hesterberg 2015): the plain
    percentile interval is too narrow for few windows; use tail Phi(-sqrt(W/(W-1)) t_{W-1})
    with t_{W-1} the Student quantile of `level`, so the interval matches a t interval."""
    import math
    from statistics import NormalDist

    df = max(num_windows - 1, 1)
    t = student_t_quantile((1.0 + level) / 2.0, df)
    return NormalDist().cdf(-math.sqrt(num_windows / df) * t)


def percentile_ci(samples: np.ndarray, tail: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval [q_tail, q_{1-tail}] over axis 0 of samples [B, E]."""
    import numpy as np

    return np.quantile(samples, tail, axis=0), np.quantile(samples, 1.0 - tail, axis=0)


def drop_frequency(samples: np.ndarray, n_drop: int) -> np.ndarray:
    """Share of replicates (rows of samples [B, E]) in which each expert is among the n_drop
    lowest (ties broken by expert id, as a stable sort would)."""
    import numpy as np

    if n_drop <= 0:
        return np.zeros(samples.shape[1])
    order = np.argsort(samples, axis=1, kind="stable")[:, :n_drop]
    return np.bincount(order.ravel(), minlength=samples.shape[1]) / samples.shape[0]


def zero_count_upper(total_slots: int, level: float) -> float:
    """Clopper-Pearson upper limit of a share observed 0 times in `total_slots` slots."""
    return 1.0 - ((1.0 - level) / 2.0) ** (1.0 / max(total_slots, 1))


def growth_to_stabilise(point: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_drop: int,
                        unstable: np.ndarray) -> float:
    """Factor by which the token count must grow for every unstable decision to settle
    (1.0 when none is unstable, inf on exact ties at the cut)."""
    import numpy as np

    if not unstable.any() or n_drop <= 0 or n_drop >= point.size:
        return 1.0
    ranked = np.sort(point, kind="stable")
    cut = (ranked[n_drop - 1] + ranked[n_drop]) / 2.0
    gap = np.abs(point[unstable] - cut)
    half = (hi[unstable] - lo[unstable]) / 2.0
    with np.errstate(divide="ignore"):
        factor = np.where(gap > 0, (half / gap) ** 2, np.inf)
    return float(max(factor.max(), 1.0))


def layer_uncertainty(tokens: np.ndarray, reap: np.ndarray, *, ratio: float,
                      criterion: str = "frequency", replicates: int = 1000, seed: int = 0,
                      level: float = 0.95, extra: dict[str, np.ndarray] | None = None
                      ) -> tuple[pd.DataFrame, float]:
    """Per-expert intervals and drop frequencies of one layer from its windows N, R [W, E].
    Returns the table and the token growth factor that would settle every decision."""
    import numpy as np
    import pandas as pd

    weights = multiplicities(tokens.shape[0], replicates, seed)
    boot_n, boot_r = weights @ tokens, weights @ reap                       # [B, E]
    total_n, total_r = tokens.sum(axis=0), reap.sum(axis=0)
    tail = expanded_tail(level, tokens.shape[0])
    share_lo, share_hi = percentile_ci(scores(boot_n, boot_r, "frequency"), tail)
    extra = extra or {}
    samples = scores(boot_n, boot_r, criterion, {k: weights @ v for k, v in extra.items()})
    point = scores(total_n, total_r, criterion, {k: v.sum(axis=0) for k, v in extra.items()})
    score_lo, score_hi = percentile_ci(samples, tail)
    n_drop = int(round(ratio * tokens.shape[1]))
    freq = drop_frequency(samples, n_drop)
    dropped = np.isin(np.arange(point.size), np.argsort(point, kind="stable")[:n_drop])
    unstable = np.minimum(freq, 1.0 - freq) > UNSTABLE
    upper = np.maximum(share_hi, np.where(total_n == 0, zero_count_upper(
        int(total_n.sum()), level), 0.0))
    dead = (total_n == 0) & (upper < DEAD_FRACTION / tokens.shape[1])
    table = pd.DataFrame({
        "expert": np.arange(point.size), "tokens": total_n,
        "share": scores(total_n, total_r, "frequency"), "share_lo": share_lo,
        "share_hi": share_hi, "share_upper": upper, "score": point, "score_lo": score_lo,
        "score_hi": score_hi, "dropped": dropped, "drop_freq": freq, "unstable": unstable,
        "dead": dead, "unseen": (total_n == 0) & ~dead})
    return table, growth_to_stabilise(point, score_lo, score_hi, n_drop, unstable)


def profile_uncertainty(profile: Profile, *, ratio: float = 0.25, criterion: str = "frequency",
                        domain: str = "all", replicates: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(expert table: one row per (layer, expert); layer table: windows, tokens, unstable
    decisions, growth factor and extra tokens that would settle them). Seeded per layer."""
    import pandas as pd

    if not 0.0 <= ratio < 1.0 or not 0.0 < level < 1.0:
        raise StatsError(f"ratio {ratio} / level {level} out of range",
                         "use 0 <= ratio < 1 and 0 < level < 1")
    experts, layers = [], []
    for i, layer in enumerate(profile.moe_layers):
        tokens, reap = windows_of(profile, layer, domain)
        table, growth = layer_uncertainty(tokens, reap, ratio=ratio, criterion=criterion,
                                          replicates=replicates, seed=seed + i, level=level,
                                          extra=extra_windows(profile, layer, domain, criterion))
        experts.append(table.assign(layer=layer))
        routed = int(tokens.sum())
        layers.append({"layer": layer, "windows": tokens.shape[0], "slots": routed,
                       "unstable": int(table["unstable"].sum()),
                       "dead": int(table["dead"].sum()), "unseen": int(table["unseen"].sum()),
                       "growth": growth, "more_slots": extra_slots(growth, routed)})
    frame = pd.concat(experts, ignore_index=True)
    return frame[["layer", *[c for c in frame.columns if c != "layer"]]], pd.DataFrame(layers)


def extra_slots(growth: float, routed: int) -> int | None:
    """Whole routed slots to add so that every decision settles, (growth - 1) x routed rounded
    up; None when no amount would (growth infinite: a tie at the cut)."""
    import math

    return math.ceil((growth - 1.0) * routed - 1e-9) if math.isfinite(growth) else None


def dead_and_unseen(counts: np.ndarray, level: float = 0.95) -> tuple[int, int]:
    """(dead, unseen) experts of one layer from its token counts [E]: zero slots with / without
    a Clopper-Pearson upper bound under DEAD_FRACTION of the fair share (no resampling needed,
    as the bootstrap upper limit of a zero count is 0)."""
    zeros = int((counts == 0).sum())
    if zero_count_upper(int(counts.sum()), level) < DEAD_FRACTION / max(counts.size, 1):
        return zeros, 0
    return 0, zeros
