"""New stats criteria, super-expert protection, the --keep-params budget and the --data CLI path
(a full run on a tiny checkpoint: provenance lists candidates and modified tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.ops.prune.trim import budget_split
from moekit.stats.criteria import criterion_scores, super_experts
from moekit.stats.expert_stats import VALUES, ExpertStats

RUNNER = CliRunner()


def _stats(values: dict[int, dict[str, list[float]]]) -> ExpertStats:
    full = {layer: {c: tuple(cols.get(c, [0.0] * len(cols["tokens"]))) for c in VALUES}
            for layer, cols in values.items()}
    return ExpertStats(Path("."), {}, "x", "all", ("all",), full)


def test_man_is_mean_norm_over_routed_tokens():
    stats = _stats({0: {"tokens": [4, 0, 2], "ean_sum": [8.0, 0.0, 5.0]}})
    scores = criterion_scores("man", stats, 0, 3, None)  # type: ignore[arg-type]
    np.testing.assert_allclose(scores, [2.0, 0.0, 2.5])


def test_super_experts_only_outstanding_ones_in_early_layers():
    rng = np.random.default_rng(0)
    layers = {i: {"tokens": [1.0] * 64, "max_norm": list(rng.uniform(1, 2, 64))}
              for i in range(8)}
    layers[1]["max_norm"][17] = 50.0
    layers[7]["max_norm"][3] = 80.0  # last quarter of layers: not a super expert
    assert super_experts(_stats(layers)) == {1: [17]}
    flat = {i: {"tokens": [1.0] * 8, "max_norm": [1.0] * 8} for i in range(4)}
    assert super_experts(_stats(flat)) == {}


@pytest.mark.parametrize("experts,width,keep", [(16, 128, 0.5), (64, 768, 0.3), (8, 32, 0.75)])
def test_keep_params_budget(experts, width, keep):
    n_drop, new_width = budget_split(experts, width, keep, top_k=2)
    assert (experts - n_drop) * new_width <= keep * experts * width + 1e-9
    assert new_width % 8 == 0 and 0 < n_drop < experts
    # the budget is nearly used: one more multiple of 8 would exceed it
    assert (experts - n_drop) * (new_width + 8) > keep * experts * width


def test_keep_params_needs_data_and_data_excludes_stats(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("mixtral")
    out = RUNNER.invoke(app, ["prune", str(folder), "--keep-params", "0.5", "--out",
                              str(tmp_path / "o")])
    assert out.exit_code == 2 and "--keep-params needs --data" in out.output
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    (tmp_path / "stats").mkdir()
    out = RUNNER.invoke(app, ["prune", str(folder), "--data", f"t={text}", "--stats",
                              str(tmp_path / "stats"), "--ratio", "0.25", "--out",
                              str(tmp_path / "o")])
    assert out.exit_code == 2 and "--data is given with --stats" in out.output


def test_prune_with_data_writes_provenance(tiny_checkpoint, tmp_path):
    from tiny_models import _docstring_corpus

    folder = tiny_checkpoint("qwen3_moe")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(_docstring_corpus()[:800]))
    out = RUNNER.invoke(app, ["prune", str(folder), "--data", f"doc={text}", "--ratio", "0.25",
                              "--max-tokens", "512", "--seq-len", "64", "--beam", "2",
                              "--device", "cpu", "--refit-router",
                              "--out", str(tmp_path / "o")])
    assert out.exit_code == 0, out.output
    record = json.loads((tmp_path / "o" / "moekit_provenance.json").read_text())
    calibration = record["calibration"]
    names = [c["candidate"] for c in calibration["candidates"]]
    assert names == ["measured+compensate", "measured+compensate-router", "measured"]
    chosen = [c for c in calibration["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["candidate"] == record["criterion"]
    assert chosen[0]["kl_held_out"] == min(c["kl_held_out"] for c in calibration["candidates"])
    if record["criterion"].startswith("measured+compensate"):
        assert calibration["modified_tensors"]
    if record["criterion"] == "measured+compensate-router":
        assert all("expert" in row for row in calibration["modified_tensors"])
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config.get("num_experts", config.get("num_local_experts")) == 6
