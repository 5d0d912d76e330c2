"""Is the evaluated text held out? The calibration text a checkpoint was made with, as its
`moekit_provenance.json` records it: `calibration` (prune/merge --data: data hash, sources,
range) and the `stats` folder's profile (per domain: text hash and files, `data_range`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.io.card import PROVENANCE_NAME

Record = tuple[str, set[str], list[Path], tuple[float, float]]  # label, hashes, paths, range


def calibration_overlap(model: Path, domains: list[Any], fraction: tuple[float, float]
                        ) -> list[str]:
    """One warning per evaluated domain whose text hash equals a recorded calibration hash,
    or whose files were calibrated on in an overlapping --data-range."""
    warnings = []
    for domain in domains:
        for label, hashes, paths, span in _records(Path(model)):
            same = domain.sha256 in hashes
            if same or (_shared(domain.files, paths) and span[0] < fraction[1]
                        and fraction[0] < span[1]):
                warnings.append(
                    f"eval data '{domain.name}' {'is' if same else 'overlaps'} the text "
                    f"{Path(model).name} was calibrated on ({label}, range "
                    f"{span[0]:g}:{span[1]:g}): its loss is not a held-out measure (evaluate "
                    "other text, or a --data-range outside the calibration range)")
                break
    return warnings


def _records(model: Path) -> list[Record]:
    prov = _json(model / PROVENANCE_NAME)
    found: list[Record] = []
    cal = prov.get("calibration")
    if isinstance(cal, dict) and cal.get("data_hash"):
        sources = cal.get("sources") if isinstance(cal.get("sources"), dict) else {}
        found.append((f"{prov.get('operation', 'calibration')} --data", {str(cal["data_hash"])},
                      [Path(str(p)) for p in sources.values()], _span(cal.get("fraction"))))
    stats = prov.get("stats") if isinstance(prov.get("stats"), dict) else {}
    if stats.get("folder"):
        meta = _json(Path(str(stats["folder"])) / "metadata.json")
        domains = meta.get("domains") if isinstance(meta.get("domains"), dict) else {}
        for name, info in domains.items():
            if isinstance(info, dict):
                found.append((f"profile {stats['folder']}, domain {name}",
                              {str(info.get("sha256"))},
                              [Path(str(f)) for f in info.get("files") or []],
                              _span(meta.get("data_range"))))
    return found


def _json(path: Path) -> dict[str, Any]:
    """A JSON object, or {} when absent or unreadable (the check is advisory)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _span(value: Any) -> tuple[float, float]:
    """A recorded range ("0:0.8" or [0, 0.8]); the whole text when absent or odd."""
    try:
        start, end = value.split(":") if isinstance(value, str) else value
        return float(start), float(end)
    except (TypeError, ValueError):
        return 0.0, 1.0


def _shared(files: list[str], paths: list[Path]) -> bool:
    """Some evaluated file is a calibration file or lies in a calibration folder."""
    roots = [p.resolve() for p in paths]
    return any(Path(f).resolve() == r or Path(f).resolve().is_relative_to(r)
               for f in files for r in roots)
