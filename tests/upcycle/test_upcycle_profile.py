"""An upcycled checkpoint is a normal MoE checkpoint: `moekit profile` runs on it."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from moekit.cli.app import app


def test_profile_runs_on_upcycled_checkpoint(tiny_checkpoint, tmp_path) -> None:
    dense = tiny_checkpoint("qwen3")
    moe, prof = tmp_path / "moe", tmp_path / "prof"
    data = tmp_path / "text.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 40)
    runner = CliRunner()
    result = runner.invoke(app, ["upcycle", str(dense), "--arch", "qwen3_moe", "-e", "4",
                                 "-k", "2", "--method", "copy", "--out", str(moe)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["profile", str(moe), "--data", f"t={data}", "--seq-len", "32",
                                 "--max-tokens", "200", "--device", "cpu", "--no-plots",
                                 "--out", str(prof)])
    assert result.exit_code == 0, result.output
    meta = json.loads((prof / "metadata.json").read_text())
    stats = pd.read_csv(prof / "expert_stats.csv")
    totals = stats[stats.domain == "all"].groupby("layer")["tokens"].sum()
    tokens = meta["domains"]["t"]["tokens"]
    assert sorted(totals.index) == meta["moe_layers"] == [0, 1]
    assert (totals == 2 * tokens).all()  # every token fills exactly k=2 routed slots per layer
