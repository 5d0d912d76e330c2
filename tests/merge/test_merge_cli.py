"""`moekit merge` end to end: function preservation on a copy-upcycled model, plans, grouped
routing, and bad input rejected with one line, exit code 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prune_support import write_synthetic_stats
from support import run
from tiny_models import VOCAB, read_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moekit.families.layout import describe
from moekit.io.reader import Checkpoint

RUNNER = CliRunner()
IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def stats_for(folder: Path, where: Path) -> Path:
    layout = describe(Checkpoint(folder))
    tokens = {layer.index: [float((3 * j + 1) % 7 + 1) for j in range(layer.num_experts)]
              for layer in layout.moe_layers}
    return write_synthetic_stats(where, folder, tokens)


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def upcycled(tiny_checkpoint, tmp_path) -> Path:
    """A copy-upcycled Mixtral: 8 identical experts per layer, top-2, renormalised."""
    out = tmp_path / "upcycled"
    result = run("upcycle", tiny_checkpoint("llama"), "--arch", "mixtral", "-e", "8", "-k", "2",
                 "--method", "copy", "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(("group", "method", "router"), [
    ("weight", "average", "centre"), ("weight", "aligned", "usage"),
    ("m-smoe", "fit", "centre"), ("hc-smoe", "fit", "usage"), ("m-smoe", "fit-layer", "centre")])
def test_merging_identical_experts_keeps_the_logits(upcycled, tiny_checkpoint, tmp_path, group,
                                                    method, router):
    text = tmp_path / "calib.txt"
    text.write_text("for item in items:\n    print(item)\n" * 100)
    out = tmp_path / "merged"
    result = run("merge", upcycled, "--stats", stats_for(upcycled, tmp_path / "stats"),
                 "--ratio", "0.5", "--group", group, "--method", method, "--router", router,
                 "--data", f"t={text}", "--max-tokens", "128", "--seq-len", "32", "--out", out)
    assert result.exit_code == 0, result.output
    assert read_config(out)["num_local_experts"] == 4
    reference = logits(tiny_checkpoint("llama"))
    assert torch.allclose(logits(upcycled), reference, atol=1e-5)
    assert (logits(out) - reference).abs().max() < 1e-4


def test_dry_run_plan_round_trip(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen3_moe")
    stats = stats_for(source, tmp_path / "stats")
    plan_file = tmp_path / "plan.json"
    result = run("merge", source, "--stats", stats, "--ratio", "0.25", "--group", "weight",
                 "--method", "aligned", "--dry-run", "--plan-out", plan_file)
    assert result.exit_code == 0, result.output
    assert not any(p.name.startswith("merged") for p in tmp_path.iterdir())
    plan = json.loads(plan_file.read_text())
    assert all(len(p["clusters"]) == 6 for p in plan["layers"])
    direct, planned = tmp_path / "merged-direct", tmp_path / "merged-plan"
    assert run("merge", source, "--stats", stats, "--ratio", "0.25", "--group", "weight",
               "--method", "aligned", "--out", direct).exit_code == 0
    result = run("merge", source, "--plan", plan_file, "--out", planned)
    assert result.exit_code == 0, result.output
    assert (direct / "model.safetensors").read_bytes() == (planned / "model.safetensors"
                                                           ).read_bytes()
    record = json.loads((planned / "moekit_provenance.json").read_text())
    layer = record["layers"][0]
    assert sorted(int(k) for k in layer["old_to_new"]) == list(range(8))
    assert all(layer["old_to_new"][str(j)] == i for i, c in enumerate(layer["clusters"])
               for j in c)


def test_grouped_routing_keeps_clusters_in_groups(tiny_checkpoint, tmp_path):
    """DeepSeek-V3 with n_group=2 (experts 0-3 and 4-7): removing 2 of 8 folds one expert per
    group, inside its group; the config keeps its groups."""
    source = tiny_checkpoint("deepseek_v3")
    plan_file = tmp_path / "plan.json"
    out = tmp_path / "merged"
    result = run("merge", source, "--stats", stats_for(source, tmp_path / "stats"), "--ratio",
                 "0.25", "--group", "weight", "--method", "aligned", "--plan-out", plan_file,
                 "--out", out)
    assert result.exit_code == 0, result.output
    for layer in json.loads(plan_file.read_text())["layers"]:
        assert len(layer["clusters"]) == 6
        for cluster in layer["clusters"]:
            assert len({j // 4 for j in cluster}) == 1, cluster
        assert sum(1 for c in layer["clusters"] if c[0] < 4) == 3
    config = read_config(out)
    assert config["n_routed_experts"] == 6 and config["n_group"] == 2


@pytest.mark.parametrize(("case", "message"), [
    ("ratio", "outside [0, 1)"), ("too-few", "top_k=2 but only 1 experts would remain"),
    ("other-stats", "another model"), ("exists", "exists and is not empty"),
    ("group", "unknown --group")])
def test_bad_input_is_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, case, message):
    source = tiny_checkpoint("mixtral")
    stats = stats_for(source, tmp_path / "stats")
    out = tmp_path / "out"
    args: list[object] = ["--ratio", "0.5", "--group", "weight", "--method", "average"]
    if case == "ratio":
        args[1] = "1.5"
    elif case == "too-few":
        args[1] = "0.9"
    elif case == "other-stats":
        stats = stats_for(tiny_checkpoint("mixtral", num_hidden_layers=3), tmp_path / "other")
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "group":
        args[3] = "kmeans"
    result = run("merge", source, "--stats", stats, *args, "--out", out)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.moekit-partial-*"))


@pytest.mark.parametrize("group", ["weight", "m-smoe"])
def test_super_experts_are_never_folded(tiny_checkpoint, tmp_path, group):
    """An expert with an outstanding max_norm (a super expert, as `prune` protects it) stays a
    singleton cluster; --no-protect-super lets it be folded like any other."""
    import pandas as pd

    from moekit.stats.expert_stats import STATS_CSV, STATS_PARQUET

    source = tiny_checkpoint("qwen3_moe")
    stats = stats_for(source, tmp_path / "stats")
    first = describe(Checkpoint(source)).moe_layers[0].index
    frame = pd.read_parquet(stats / STATS_PARQUET)
    ean = frame[(frame["layer"] == first) & (frame["domain"] == "all")].set_index("expert")
    weakest = int(ean["ean_sum"].idxmin())                  # never a centre on its own merit
    frame.loc[(frame["layer"] == first) & (frame["expert"] == weakest), "max_norm"] = 1e3
    frame.to_parquet(stats / STATS_PARQUET, index=False)
    frame.to_csv(stats / STATS_CSV, index=False)
    clusters = {}
    for flag in ("--protect-super", "--no-protect-super"):
        plan = tmp_path / f"plan{flag}.json"
        result = run("merge", source, "--stats", stats, "--ratio", "0.75", "--group", group,
                     "--method", "average", "--dry-run", "--plan-out", plan, flag)
        assert result.exit_code == 0, result.output
        clusters[flag] = next(p["clusters"] for p in json.loads(plan.read_text())["layers"]
                              if p["layer"] == first)
        assert len(clusters[flag]) == 2
    assert [weakest] in clusters["--protect-super"]
    assert all(len(c) > 1 for c in clusters["--no-protect-super"] if weakest in c)


@pytest.mark.parametrize("group", ["m-smoe", "weight"])
def test_data_without_stats_records_them_as_profile_would(tiny_checkpoint, tmp_path, group):
    """`merge --data` and no `--stats`: the grouping uses statistics recorded on that data,
    the same a `moekit profile` of the same tokens gives (same clusters and centres)."""
    source = tiny_checkpoint("mixtral")
    sample = Path(__file__).resolve().parents[2] / "sample_data"
    data = [a for f in ("en_docs", "code_py") for a in ("--data", f"{f}={sample / f}.txt")]
    settings = ["--max-tokens", 512, "--seq-len", 64, "--device", "cpu"]
    import tempfile

    left = set(Path(tempfile.gettempdir()).glob("moekit-merge-stats-*"))
    prof = tmp_path / "prof"
    result = run("profile", source, *data, "--max-tokens", 512, "--seq-len", 64,
                 "--batch-size", 4, "--dtype", "float32", "--device", "cpu", "--out", prof,
                 "--no-plots")
    assert result.exit_code == 0, result.output
    plans = {}
    for name, extra in (("given", ["--stats", prof]), ("recorded", [])):
        plans[name] = tmp_path / f"{name}.json"
        result = run("merge", source, *data, *settings, *extra, "--ratio", 0.5, "--group", group,
                     "--dry-run", "--plan-out", plans[name])
        assert result.exit_code == 0, result.output
    given, recorded = (json.loads(plans[n].read_text()) for n in ("given", "recorded"))
    assert [p["clusters"] for p in recorded["layers"]] == [p["clusters"] for p in given["layers"]]
    assert "recording routing statistics" in result.stderr
    assert set(Path(tempfile.gettempdir()).glob("moekit-merge-stats-*")) == left


def test_no_stats_and_no_data_needed_names_both_fixes(tiny_checkpoint, tmp_path):
    result = run("merge", tiny_checkpoint("mixtral"), "--ratio", 0.5, "--group", "weight",
                 "--method", "average", "--out", tmp_path / "m")
    assert result.exit_code == 2
    assert "--stats DIR" in result.stderr and "--data NAME=PATH" in result.stderr
    assert not (tmp_path / "m").exists()
