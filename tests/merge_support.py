"""Helpers of the merge tests that compare whole output folders (`test_merge_onepass.py`,
`test_merge_effort.py`): a two-domain corpus, the library's merge as the CLI calls it, and
folder comparisons less the run records."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moekit.calib.data import DataSource
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint

OPTIONS = {"max_tokens": 1000, "seq_len": 64, "batch_size": 4, "fraction": (0.0, 0.5)}


def corpus(tmp_path: Path) -> list[DataSource]:
    """Two domains of pseudo-text. 1000 tokens -> 500 per domain for the grouping: windows of
    64 in batches [4, 64], [3, 64] and a short [1, 52] one."""
    gen = torch.Generator().manual_seed(5)
    words = ["def", "return", "item", "value", "for", "in", "print", "the", "data", "x", "+",
             "(", ")", ":", "list", "name", "self", "if", "else", "None", "und", "der"]
    sources = []
    for name in ("a", "b"):
        picks = torch.randint(0, len(words), (6000,), generator=gen).tolist()
        path = tmp_path / f"{name}.txt"
        path.write_text(" ".join(words[i] for i in picks))
        sources.append(DataSource(name, path))
    return sources


def merge_with(source: Path, sources: list[DataSource], stats: Path, out: Path, group: str,
               method: str, *, one_pass: bool, ratio: float = 0.5,
               options: dict | None = None) -> dict:
    """choose_merge_plan + merge_checkpoint as the CLI calls them; returns the plan dict."""
    from moekit.ops.merge import merge_checkpoint
    from moekit.ops.merge.run import Calibration, choose_merge_plan

    calib = Calibration(source, describe(Checkpoint(source)), sources,
                        dict(options or OPTIONS), one_pass=one_pass)
    plan, _ = choose_merge_plan(source, stats=stats, ratio=ratio, group=group, method=method,
                                router="centre", criterion="ean", plan_in=None, calib=calib)
    saved = plan.to_dict()

    merge_checkpoint(source, plan, out, calib=calib, stats_folder=stats)
    return saved


def without_run_records(record: dict) -> dict:
    """The provenance less its time and the engines' `runtime` records (free RAM, where the
    hidden states were kept: what ran, not what was computed)."""
    record = json.loads(json.dumps(record))
    record.pop("created", None)
    calibration = record.get("calibration") or {}
    calibration.pop("runtime", None)
    (calibration.get("refit") or {}).pop("runtime", None)
    return record


def assert_same_folders(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "moekit_provenance.json":
            continue
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    record = [json.loads((f / "moekit_provenance.json").read_text()) for f in (a, b)]
    assert without_run_records(record[0]) == without_run_records(record[1])
