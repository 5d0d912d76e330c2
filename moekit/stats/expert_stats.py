"""Routing statistics as `moekit prune` reads them (the `moekit profile` output contract).

A stats folder holds `expert_stats.csv` (and/or `.parquet`) in long form, one row per
(layer, expert, domain) with columns `layer, expert, domain, tokens, weight_sum, ean_sum,
reap_sum, max_norm` (`domain == "all"` holds the totals), and `metadata.json` with at least
`model_fingerprint`, `moe_layers`, `num_experts` (int or one per MoE layer), `top_k`, `family`,
`domains`. Sums, not means, so statistics of several runs can be added.

The format is `moekit.stats.profile_io`'s (its constants are used here), but it is read with
the standard library: `load_profile` would import pandas and numpy (about 0.8 s on a busy 2-core
machine, a quarter of pruning a 4 GB checkpoint) and require the co-activation and layer files,
which pruning does not need.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.errors import StatsError
from moekit.stats.profile_io import (
    ABLATION_COLUMNS,
    EXPERT_COLUMNS,
    EXPERT_CSV,
    EXPERT_FILE,
    META_FILE,
    check_complete,
)

if TYPE_CHECKING:
    from moekit.families.layout import ModelLayout

STATS_CSV, STATS_PARQUET, METADATA = EXPERT_CSV, EXPERT_FILE, META_FILE
COLUMNS = tuple(EXPERT_COLUMNS)
VALUES = COLUMNS[3:]
OPTIONAL = tuple(ABLATION_COLUMNS)  # read when present (`profile --ablation`)


@dataclass(frozen=True)
class ExpertStats:
    """One domain's statistics: `values[layer][column][expert]` (floats, 0 where absent)."""

    folder: Path
    metadata: dict[str, Any]
    sha256: str
    domain: str
    domains: tuple[str, ...]
    values: dict[int, dict[str, tuple[float, ...]]]

    @property
    def layers(self) -> list[int]:
        return sorted(self.values)

    def column(self, layer: int, name: str) -> tuple[float, ...]:
        return self.values[layer][name]


def load_stats(folder: Path, domain: str = "all") -> ExpertStats:
    """Read a stats folder and keep the rows of `domain` (one-line StatsError when malformed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StatsError(f"stats folder {folder} does not exist",
                         "run `moekit profile MODEL --out DIR` and pass --stats DIR")
    metadata = _metadata(folder)
    path, rows = _rows(folder)
    check_complete([(r["layer"], r["expert"], r["domain"]) for r in rows], metadata, path.name)
    domains = tuple(sorted({r["domain"] for r in rows}))
    chosen = [r for r in rows if r["domain"] == domain]
    if not chosen:
        raise StatsError(f"{path.name} has no rows for domain '{domain}' (has: "
                         f"{', '.join(domains)})", "pass --domain with one of those names")
    counts = _num_experts(metadata)
    present = VALUES + tuple(c for c in OPTIONAL if chosen and c in chosen[0])
    values: dict[int, dict[str, list[float]]] = {}
    for layer, experts in counts.items():
        values[layer] = {c: [0.0] * experts for c in present}
    for row in chosen:
        layer, expert = row["layer"], row["expert"]
        if layer not in values:
            raise StatsError(f"{path.name} has rows for layer {layer}, which metadata.json's "
                             f"moe_layers {sorted(values)} does not list")
        if not 0 <= expert < len(values[layer]["tokens"]):
            raise StatsError(f"{path.name}: layer {layer} names expert {expert}, but the layer has "
                             f"{len(values[layer]['tokens'])} experts")
        for column in present:
            values[layer][column][expert] += row[column]
    frozen = {layer: {c: tuple(v) for c, v in cols.items()} for layer, cols in values.items()}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ExpertStats(folder, metadata, digest, domain, domains, frozen)


def _metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA
    if not path.exists():
        raise StatsError(f"{folder} has no {METADATA}", "pass the folder `moekit profile` wrote")
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StatsError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(metadata, dict):
        raise StatsError(f"{path} is a JSON {type(metadata).__name__}, not an object",
                         "re-run `moekit profile`")
    missing = [k for k in ("moe_layers", "num_experts", "top_k") if k not in metadata]
    if missing:
        raise StatsError(f"{path} lacks {', '.join(missing)}",
                         "re-run `moekit profile`")
    return metadata


def _num_experts(metadata: dict[str, Any]) -> dict[int, int]:
    layers = [int(x) for x in metadata["moe_layers"]]
    counts = metadata["num_experts"]
    counts = [int(counts)] * len(layers) if not isinstance(counts, list) else list(counts)
    if len(counts) != len(layers):
        raise StatsError(f"{METADATA}: num_experts has {len(counts)} entries for "
                         f"{len(layers)} MoE layers")
    return dict(zip(layers, (int(c) for c in counts), strict=True))


def _rows(folder: Path) -> tuple[Path, list[dict[str, Any]]]:
    csv_path, parquet_path = folder / STATS_CSV, folder / STATS_PARQUET
    if csv_path.exists():
        with open(csv_path, newline="") as handle:
            raw = list(csv.DictReader(handle))
        header = list(raw[0]) if raw else []
        path = csv_path
    elif parquet_path.exists():
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(parquet_path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise StatsError(f"{parquet_path.name} is not a readable Parquet file "
                             f"({str(err).splitlines()[0]})",
                             "restore it or re-run moekit profile") from err
        header, raw, path = table.column_names, table.to_pylist(), parquet_path
    else:
        raise StatsError(f"{folder} has neither {STATS_CSV} nor {STATS_PARQUET}",
                         "pass the folder `moekit profile` wrote")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise StatsError(f"{path.name} lacks column(s) {', '.join(missing)}",
                         f"expected columns: {', '.join(COLUMNS)}")
    try:
        extra = [c for c in OPTIONAL if c in header]
        rows = [{"layer": int(r["layer"]), "expert": int(r["expert"]), "domain": str(r["domain"]),
                 **{c: _number(r[c]) for c in VALUES},
                 **{c: _number(r[c], math.nan) for c in extra}} for r in raw]
    except (TypeError, ValueError) as err:
        raise StatsError(f"{path.name} has a malformed row ({err})") from err
    return path, rows


def _number(value: Any, missing: float = 0.0) -> float:
    """A float; `missing` for empty cells and NaN (0 for sums; NaN for optional means)."""
    number = float(value) if value not in (None, "") else missing
    return missing if math.isnan(number) else number


def check_stats(stats: ExpertStats, layout: ModelLayout, fingerprint: str,
                ignore_fingerprint: bool = False) -> list[str]:
    """Fail unless the statistics describe this model: same family, MoE layers, experts, top-k
    and (unless `ignore_fingerprint`) the same model fingerprint. Returns warnings: a
    fingerprint mismatch let through by `ignore_fingerprint`."""
    family = stats.metadata.get("family")
    if family and family != layout.family.name:
        raise StatsError(f"stats are for a {family} model but this checkpoint is "
                         f"{layout.family.name}", "profile this model with `moekit profile`")
    model_layers = [layer.index for layer in layout.moe_layers]
    if stats.layers != model_layers:
        raise StatsError(f"stats describe MoE layers {stats.layers} but the model has "
                         f"{model_layers}: they come from another model",
                         "profile this model with `moekit profile`")
    for layer in layout.moe_layers:
        seen = len(stats.column(layer.index, "tokens"))
        if seen != layer.num_experts:
            raise StatsError(f"stats give layer {layer.index} {seen} experts but the model has "
                             f"{layer.num_experts}: they come from another model",
                             "profile this model with `moekit profile`")
    top_k = stats.metadata.get("top_k")
    if top_k is not None and not isinstance(top_k, list) and int(top_k) != layout.top_k():
        raise StatsError(f"stats were taken with top_k={top_k} but the model routes to "
                         f"{layout.top_k()}", "profile this model with `moekit profile`")
    recorded = stats.metadata.get("model_fingerprint")
    if not ignore_fingerprint and recorded and recorded != fingerprint:
        raise StatsError(f"stats were taken on model {recorded}, not on this checkpoint "
                         f"({fingerprint})", "profile this model, or pass --ignore-fingerprint "
                         "if only its router weights changed on purpose")
    if recorded and recorded != fingerprint:
        return [f"stats were taken on model {recorded}, not on this checkpoint ({fingerprint}): "
                "used anyway (--ignore-fingerprint)"]
    return []


def write_stats(folder: Path, rows: list[dict[str, Any]], metadata: dict[str, Any]) -> Path:
    """Write rows (dicts with COLUMNS) and metadata in the contract format (CSV + Parquet).
    Used by tests and benchmarks until `moekit profile` writes them."""
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame.to_csv(folder / STATS_CSV, index=False)
    frame.to_parquet(folder / STATS_PARQUET, index=False)
    (folder / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return folder
