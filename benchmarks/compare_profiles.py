#!/usr/bin/env python3
"""Agreement of profiles and evals made on different devices (e.g. the CPU and CUDA).

    compare_profiles.py PROFILE_A PROFILE_B [PROFILE_C ...] [EVAL_A.json EVAL_B.json ...]

Profiles (folders from `moekit profile`) are compared with the first one: the share of routed
(token, slot) assignments whose expert differs, from the per-expert token counts (half the L1
distance of the counts over the total), and the largest relative difference of the weight and
EAN sums. Evals (`moekit eval --json`) are compared with the first eval: the loss per domain.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def profile_delta(a: Path, b: Path) -> str:
    key = ["layer", "expert", "domain"]
    x = pd.read_csv(a / "expert_stats.csv").set_index(key).sort_index()
    y = pd.read_csv(b / "expert_stats.csv").set_index(key).sort_index()
    moved = (x["tokens"] - y["tokens"]).abs().sum() / 2 / x["tokens"].sum()
    rel = {c: float(((x[c] - y[c]).abs() / x[c].abs().clip(lower=1e-9)).max())
           for c in ("weight_sum", "ean_sum")}
    return (f"{b.name} vs {a.name}: {moved:.4%} of routed slots moved; max rel diff "
            f"weight_sum {rel['weight_sum']:.2e}, ean_sum {rel['ean_sum']:.2e}")


def eval_delta(a: Path, b: Path) -> str:
    x = {d["name"]: d for d in json.loads(a.read_text())["domains"]}
    y = {d["name"]: d for d in json.loads(b.read_text())["domains"]}
    diffs = {n: y[n]["loss"] - x[n]["loss"] for n in x}
    worst = max(diffs, key=lambda n: abs(diffs[n]))
    return (f"{b.name} vs {a.name}: loss diff max |{diffs[worst]:+.2e}| ({worst}); "
            f"tokens {[x[n]['tokens'] for n in x]} vs {[y[n]['tokens'] for n in x]}")


def main(paths: list[str]) -> int:
    profiles = [Path(p) for p in paths if Path(p).is_dir()]
    evals = [Path(p) for p in paths if p.endswith(".json")]
    for other in profiles[1:]:
        print("compare", profile_delta(profiles[0], other))
    for other in evals[1:]:
        print("compare", eval_delta(evals[0], other))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
