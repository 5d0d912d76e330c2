"""Routing statistics as data: build, save, load and merge a profile folder.

A profile folder holds (the format `moekit prune` reads; see docs/profile.md):

- `expert_stats.parquet` / `.csv`: one row per (layer, expert, domain) with the sums
  `tokens, weight_sum, ean_sum, reap_sum` and `max_norm`; domain `all` = every domain.
- `layer_stats.csv`: one row per (layer, domain): the mergeable sums `tokens, entropy_sum,
  top1_pairs, top1_repeats` and derived metrics (entropy, MaxVio, CV, ...), see stats.metrics.
- `coactivation.npz`: `{domain}/{layer}` -> [E, E] int64 co-activation counts.
- `metadata.json`: model, fingerprint, family, layers, experts, top-k, domains, provenance.
- `windows.npz` (optional): `{domain}/{layer}/tokens` [W, E] int32 and `.../reap_sum` [W, E]
  float32 per calibration window, for bootstrap intervals (stats.uncertainty); merge
  concatenates windows.
- `trace.safetensors` (optional): per-token top-k ids and weights of the run that wrote it.

All sums are counts or float64 sums, so two profiles of the same model add up exactly.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import StatsError
from moekit.stats.metrics import layer_table
from moekit.stats.profile import ALL, Profile

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from moekit.calib.recorder import LayerRaw

FORMAT_VERSION = 1
EXPERT_COLUMNS = ["layer", "expert", "domain", "tokens", "weight_sum", "ean_sum", "reap_sum",
                  "max_norm"]
SUM_COLUMNS = ["tokens", "weight_sum", "ean_sum", "reap_sum"]
# optional (`profile --ablation`, stats.ablation): means over `ablation_tokens` positions
ABLATION_COLUMNS = ["ablation_tokens", "ablation_loss", "ablation_kl", "ablation_loss_fo"]
LAYER_RAW_COLUMNS = ["layer", "domain", "tokens", "entropy_sum", "top1_pairs", "top1_repeats"]
EXPERT_FILE, EXPERT_CSV = "expert_stats.parquet", "expert_stats.csv"
LAYER_FILE, COACT_FILE = "layer_stats.csv", "coactivation.npz"
META_FILE, TRACE_FILE = "metadata.json", "trace.safetensors"
WINDOW_FILE = "windows.npz"


def profile_from_raw(raw: list[LayerRaw], domains: list[str],
                     metadata: dict[str, Any]) -> Profile:
    """Assemble a Profile from the recorder's host sums; adds the `all` rows (sums over domains,
    max for max_norm)."""
    import numpy as np
    import pandas as pd

    expert_rows, layer_rows, coact = [], [], {}
    for layer in raw:
        per_domain = [(name, d) for d, name in enumerate(domains)] + [(ALL, None)]
        for name, d in per_domain:
            pick = (lambda a, d=d: a[d]) if d is not None else (lambda a: a.sum(axis=0))
            max_norm = layer.max_norm[d] if d is not None else layer.max_norm.max(axis=0)
            expert_rows.append(pd.DataFrame({
                "layer": layer.layer, "expert": np.arange(layer.num_experts), "domain": name,
                "tokens": pick(layer.tokens), "weight_sum": pick(layer.weight_sum),
                "ean_sum": pick(layer.ean_sum), "reap_sum": pick(layer.reap_sum),
                "max_norm": max_norm}))
            layer_rows.append({"layer": layer.layer, "domain": name,
                               "tokens": int(pick(layer.positions)),
                               "entropy_sum": float(pick(layer.entropy_sum)),
                               "top1_pairs": int(pick(layer.top1_pairs)),
                               "top1_repeats": int(pick(layer.top1_repeats))})
            coact[f"{name}/{layer.layer}"] = pick(layer.coact).astype(np.int64)
    experts = _typed(pd.concat(expert_rows, ignore_index=True))
    windows = {f"{name}/{layer.layer}/{key}": arrays[d]
               for layer in raw if layer.window_tokens
               for key, arrays in (("tokens", layer.window_tokens),
                                   ("reap_sum", layer.window_reap),
                                   ("weight_sum", layer.window_weight),
                                   ("ean_sum", layer.window_ean)) if arrays
               for d, name in enumerate(domains)}
    return _finish(metadata, experts, pd.DataFrame(layer_rows, columns=LAYER_RAW_COLUMNS), coact,
                   windows=windows or None)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    extra = [c for c in ABLATION_COLUMNS if c in frame.columns]
    frame = frame[EXPERT_COLUMNS + extra].copy()
    for column in ("layer", "expert", "tokens", *extra[:1]):
        frame[column] = frame[column].fillna(0).astype("int64")
    for column in ("weight_sum", "ean_sum", "reap_sum", "max_norm", *extra[1:]):
        frame[column] = frame[column].astype("float64")
    frame["domain"] = frame["domain"].astype(str)
    return frame


def _finish(metadata: dict[str, Any], experts: pd.DataFrame, layer_raw: pd.DataFrame,
            coact: dict[str, np.ndarray], trace: dict[str, np.ndarray] | None = None,
            windows: dict[str, np.ndarray] | None = None) -> Profile:
    order = {name: i for i, name in enumerate([*metadata.get("domains", {}), ALL])}
    experts = experts.assign(_d=experts["domain"].map(order)).sort_values(
        ["layer", "_d", "expert"]).drop(columns="_d").reset_index(drop=True)
    return Profile(metadata, experts, layer_table(experts, layer_raw, order), coact, trace,
                   windows)


def save_profile(profile: Profile, folder: Path) -> list[str]:
    """Write the profile's files into `folder` (normally a staged output). Returns the names."""
    import numpy as np

    folder = Path(folder)
    profile.expert_stats.to_parquet(folder / EXPERT_FILE, index=False)
    profile.expert_stats.to_csv(folder / EXPERT_CSV, index=False)
    profile.layer_stats.to_csv(folder / LAYER_FILE, index=False)
    np.savez_compressed(folder / COACT_FILE, **profile.coactivation)
    names = [EXPERT_FILE, EXPERT_CSV, LAYER_FILE, COACT_FILE, META_FILE]
    if profile.windows:
        np.savez_compressed(folder / WINDOW_FILE, **profile.windows)
        names.append(WINDOW_FILE)
    if profile.trace:
        _save_trace(profile.trace, folder / TRACE_FILE, profile.metadata)
        names.append(TRACE_FILE)
    (folder / META_FILE).write_text(json.dumps(profile.metadata, indent=2) + "\n")
    return names


def _save_trace(trace: dict[str, np.ndarray], path: Path, metadata: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {key: torch.from_numpy(value).contiguous() for key, value in trace.items()}
    save_file(tensors, str(path), metadata={"moekit_format": "trace-v1", "model_fingerprint":
                                            str(metadata.get("model_fingerprint", ""))})


def load_trace(folder: Path) -> dict[str, np.ndarray]:
    """`{domain}/input_ids` [N] int32, `{domain}/layer_{i}/ids` [N, k], `.../weights` [N, k]."""
    from safetensors.numpy import load_file

    path = Path(folder) / TRACE_FILE
    if not path.exists():
        raise StatsError(f"{folder} has no {TRACE_FILE}", "re-run moekit profile with --trace")
    return load_file(str(path))


def load_profile(folder: Path) -> Profile:
    """Read a profile folder written by `moekit profile` or `moekit stats merge`."""
    import numpy as np
    import pandas as pd

    folder = Path(folder)
    if not (folder / META_FILE).exists():
        raise StatsError(f"{folder} is not a moekit profile (no {META_FILE})",
                         "pass a folder written by moekit profile --out")
    try:
        metadata = json.loads((folder / META_FILE).read_text())
        experts = (pd.read_parquet(folder / EXPERT_FILE) if (folder / EXPERT_FILE).exists()
                   else pd.read_csv(folder / EXPERT_CSV))
        layers = pd.read_csv(folder / LAYER_FILE)
        with np.load(folder / COACT_FILE) as npz:
            coact = {key: npz[key] for key in npz.files}
        windows = None
        if (folder / WINDOW_FILE).exists():
            with np.load(folder / WINDOW_FILE) as npz:
                windows = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as err:
        raise StatsError(f"cannot read the profile in {folder}: {err}".splitlines()[0],
                         "re-run moekit profile") from err
    missing = [c for c in EXPERT_COLUMNS if c not in experts.columns]
    missing += [c for c in LAYER_RAW_COLUMNS if c not in layers.columns]
    if not isinstance(metadata, dict):
        raise StatsError(f"{folder / META_FILE} is a JSON {type(metadata).__name__}, not an "
                         "object", "re-run moekit profile")
    if missing or "model_fingerprint" not in metadata:
        raise StatsError(f"{folder}: profile files lack {missing or ['model_fingerprint']}",
                         "re-run moekit profile with this moekit version")
    experts = _typed(experts)
    check_complete(list(zip(experts["layer"], experts["expert"], experts["domain"],
                            strict=True)),
                   metadata, EXPERT_FILE if (folder / EXPERT_FILE).exists() else EXPERT_CSV)
    layers["domain"] = layers["domain"].astype(str)
    return _finish(metadata, experts, layers[LAYER_RAW_COLUMNS], coact,
                   windows=windows)


def check_complete(keys: list[tuple[int, int, str]], metadata: Any, name: str) -> None:
    """Refuse an expert table that does not hold exactly one row per (MoE layer, expert,
    domain) that `metadata.json` describes: a truncated or edited file would otherwise count
    its missing experts as never routed. `keys` are the table's (layer, expert, domain)."""
    from collections import Counter

    seen = Counter(keys)
    expected = _expected_keys(metadata, {d for _, _, d in seen})
    missing = [k for k in expected if k not in seen]
    repeated = [k for k, n in seen.items() if n > 1]
    if missing or repeated:
        layer, expert, domain = (missing or repeated)[0]
        what = f"no row for layer {layer} expert {expert} domain '{domain}'" if missing else (
            f"the row of layer {layer} expert {expert} domain '{domain}' {seen[repeated[0]]} "
            "times")
        raise StatsError(f"{name} has {len(keys)} rows where {META_FILE} describes "
                         f"{len(expected)} (one per MoE layer, expert and domain): {what}",
                         f"{name} is truncated or edited: restore it or re-run moekit profile")


def _expected_keys(metadata: Any, found_domains: set[str]) -> list[tuple[int, int, str]]:
    """Every (layer, expert, domain) `metadata.json` describes, for `all` and each domain the
    table holds (rows are sorted by layer first, so a cut file lacks whole layers)."""
    if not isinstance(metadata, dict):
        raise StatsError(f"{META_FILE} is a JSON {type(metadata).__name__}, not an object",
                         "re-run moekit profile")
    try:
        layers = [int(x) for x in metadata["moe_layers"]]
        counts = metadata["num_experts"]
        counts = [int(c) for c in counts] if isinstance(counts, list) else [int(counts)] * len(
            layers)
        domains = sorted({ALL, *found_domains})
    except (KeyError, TypeError, ValueError) as err:
        raise StatsError(f"{META_FILE}: malformed moe_layers or num_experts ({err})",
                         "re-run moekit profile") from err
    if len(counts) != len(layers):
        raise StatsError(f"{META_FILE}: num_experts has {len(counts)} entries for "
                         f"{len(layers)} MoE layers", "re-run moekit profile")
    return [(layer, e, str(d)) for layer, n in zip(layers, counts, strict=True)
            for e in range(n) for d in domains]


def merge_profiles(profiles: list[Profile], allow_duplicates: bool = False) -> Profile:
    """Add profiles of the same model: counts and sums add, max_norm takes the max, domains with
    the same name add up. Metadata is the first profile's, with merged domains, this command
    line and time. The same data twice (equal domain sha256, see `duplicate_data`) would count
    double: refused unless `allow_duplicates` (then listed in metadata `duplicates`)."""
    import pandas as pd

    if not profiles:
        raise StatsError("nothing to merge", "pass at least one profile folder")
    first = profiles[0]
    for other in profiles[1:]:
        _check_compatible(first, other)
    duplicates = duplicate_data(profiles)
    if duplicates and not allow_duplicates:
        raise StatsError(f"{duplicates[0]}: merging would count its tokens twice",
                         "merge profiles of different data, or pass --allow-duplicates")
    experts = pd.concat([p.expert_stats for p in profiles], ignore_index=True)
    means = _ablation_means(profiles)
    if means:  # means -> sums
        experts[means] = experts[means].mul(experts["ablation_tokens"], axis=0)
    agg = {c: "sum" for c in SUM_COLUMNS + (["ablation_tokens", *means] if means else [])}
    experts = experts.groupby(["layer", "expert", "domain"], as_index=False, sort=False).agg(
        agg | {"max_norm": "max"})
    if means:  # token-weighted means again (0 tokens: NaN)
        experts[means] = experts[means].div(experts["ablation_tokens"].where(
            experts["ablation_tokens"] > 0), axis=0)
    layers = pd.concat([p.layer_stats[LAYER_RAW_COLUMNS] for p in profiles], ignore_index=True)
    layers = layers.groupby(["layer", "domain"], as_index=False, sort=False).sum()
    coact: dict[str, np.ndarray] = {}
    for profile in profiles:
        for key, value in profile.coactivation.items():
            coact[key] = coact[key] + value if key in coact else value.copy()
    meta = _merged_metadata(profiles) | ({"duplicates": duplicates} if duplicates else {})
    if not means:
        meta.pop("ablation", None)
    return _finish(meta, _typed(experts), layers, coact, windows=_merged_windows(profiles))


def _ablation_means(profiles: list[Profile]) -> list[str]:
    """The ablation mean columns every input has (none unless all inputs were ablated: a
    mean over part of the data would pass for the whole)."""
    have = [set(p.expert_stats.columns) for p in profiles]
    if not all("ablation_tokens" in h for h in have):
        return []
    return [c for c in ABLATION_COLUMNS[1:] if all(c in h for h in have)]


def _merged_windows(profiles: list[Profile]) -> dict[str, np.ndarray] | None:
    """Windows of all inputs, concatenated in input order per key; None unless every input
    has them (a bootstrap over part of the data would misstate the uncertainty)."""
    import numpy as np

    if not all(p.windows for p in profiles):
        return None
    columns = set.intersection(*({k.rsplit("/", 1)[1] for k in p.windows} for p in profiles))
    keys = dict.fromkeys(k for p in profiles for k in p.windows
                         if k.rsplit("/", 1)[1] in columns)  # older inputs: tokens, reap only
    return {k: np.concatenate([p.windows[k] for p in profiles if k in p.windows]) for k in keys}


def duplicate_data(profiles: list[Profile]) -> list[str]:
    """One line per domain whose data (sha256 of the text used) already occurs in an earlier
    input: merging such profiles counts the same tokens twice."""
    seen: dict[str, tuple[int, str]] = {}
    found = []
    for i, profile in enumerate(profiles, start=1):
        for name, info in profile.metadata.get("domains", {}).items():
            sha = info.get("sha256")
            if sha and sha in seen:
                j, other = seen[sha]
                found.append(f"domain '{name}' of input {i} is the same data as '{other}' of "
                             f"input {j} (sha256 {sha})")
            elif sha:
                seen[sha] = (i, name)
    return found


def _check_compatible(a: Profile, b: Profile) -> None:
    if a.fingerprint != b.fingerprint:
        raise StatsError(
            f"profiles belong to different models: fingerprint {a.fingerprint} "
            f"({a.metadata.get('model')}) vs {b.fingerprint} ({b.metadata.get('model')})",
            "merge only profiles of the same checkpoint")
    if a.moe_layers != b.moe_layers or a.metadata.get("num_experts") != b.metadata.get(
            "num_experts"):
        raise StatsError("profiles disagree on MoE layers or expert counts",
                         "merge only profiles of the same checkpoint")


def _merged_metadata(profiles: list[Profile]) -> dict[str, Any]:
    meta = {k: v for k, v in profiles[0].metadata.items() if k not in ("trace", "merged_from")}
    domains: dict[str, dict[str, Any]] = {}
    for profile in profiles:
        for name, info in profile.metadata.get("domains", {}).items():
            if name not in domains:
                domains[name] = {**info, "files": list(info.get("files", []))}
                continue
            known = domains[name]
            known["tokens"] = int(known["tokens"]) + int(info["tokens"])
            joined = f"{known['sha256']}+{info['sha256']}".encode()
            known["sha256"] = hashlib.sha256(joined).hexdigest()[:16]
            known["files"] += [f for f in info.get("files", []) if f not in known["files"]]
    meta["domains"] = domains
    meta["trace"] = False
    meta["merged_from"] = [_summary(p.metadata) for p in profiles]
    meta["command"] = shlex.join(["moekit", *sys.argv[1:]])
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return meta


def _summary(metadata: dict[str, Any]) -> dict[str, Any]:
    if "merged_from" in metadata:
        return {"merged_from": metadata["merged_from"]}
    keys = ("model", "command", "created", "seq_len", "data_range", "moekit_version")
    return {k: metadata.get(k) for k in keys} | {
        "domains": {n: i.get("tokens") for n, i in metadata.get("domains", {}).items()}}
