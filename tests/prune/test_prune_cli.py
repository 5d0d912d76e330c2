"""`moekit prune` end to end on tiny checkpoints: exact pass-through, plans, grouped routing,
protection, lists, sharding, and bad input rejected before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prune_support import write_synthetic_stats
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.io.reader import Checkpoint

RUNNER = CliRunner()


def _run(*args: object):
    return RUNNER.invoke(app, ["prune", *map(str, args)])


def _stats(tmp_path: Path, folder: Path, name: str = "stats", **kw) -> Path:
    """Counts t_j = (7 j + 3) mod 11 + layer: a fixed, uneven ranking."""
    from moekit.families.layout import describe

    layout = describe(Checkpoint(folder))
    tokens = {layer.index: [float((7 * j + 3) % 11 + layer.index)
                            for j in range(layer.num_experts)] for layer in layout.moe_layers}
    return write_synthetic_stats(tmp_path / name, folder, tokens, **kw)


def _raw(checkpoint: Checkpoint, name: str) -> bytes:
    info = checkpoint.tensors[name]
    with open(info.shard, "rb") as handle:
        handle.seek(info.start)
        return handle.read(info.nbytes)


@pytest.fixture
def mixtral(tiny_checkpoint) -> Path:
    return tiny_checkpoint("mixtral")


def test_ratio_zero_reproduces_every_tensor_byte_for_byte(mixtral, tmp_path):
    result = _run(mixtral, "--stats", _stats(tmp_path, mixtral), "--ratio", 0, "--out",
                  tmp_path / "out")
    assert result.exit_code == 0, result.output
    source, copy = Checkpoint(mixtral), Checkpoint(tmp_path / "out")
    assert set(source.tensors) == set(copy.tensors)
    for name, info in source.tensors.items():
        assert (copy.tensors[name].dtype, copy.tensors[name].shape) == (info.dtype, info.shape)
        assert _raw(copy, name) == _raw(source, name), name
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == source.config


def test_prune_renumbers_and_slices_like_an_independent_copy(mixtral, tmp_path):
    """Frequency drops the lowest counts; the output matches slicing the source by hand."""
    stats = _stats(tmp_path, mixtral)
    result = _run(mixtral, "--stats", stats, "--ratio", 0.25, "--criterion", "frequency",
                  "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    source, out = Checkpoint(mixtral), Checkpoint(tmp_path / "out")
    for layer in (0, 1):
        counts = [(7 * j + 3) % 11 + layer for j in range(8)]
        dropped = sorted(sorted(range(8), key=lambda j: (counts[j], j))[:2])
        kept = [j for j in range(8) if j not in dropped]
        prefix = f"model.layers.{layer}.block_sparse_moe."
        router = source.read(prefix + "gate.weight")
        assert torch.equal(out.read(prefix + "gate.weight"), router[kept])
        for new, old in enumerate(kept):
            for w in ("w1", "w2", "w3"):
                assert _raw(out, f"{prefix}experts.{new}.{w}.weight") == _raw(
                    source, f"{prefix}experts.{old}.{w}.weight")
        assert f"{prefix}experts.6.w1.weight" not in out.tensors
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_local_experts"] == 6 and config["num_experts_per_tok"] == 2
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- pruned" in card and "- mixtral" in card and "What was removed" in card


def test_dry_run_writes_only_the_plan_and_plan_replays(mixtral, tmp_path):
    stats = _stats(tmp_path, mixtral)
    plan = tmp_path / "plan.json"
    result = _run(mixtral, "--stats", stats, "--ratio", 0.5, "--criterion", "reap",
                  "--dry-run", "--plan-out", plan, "--out", tmp_path / "never")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "never").exists()
    data = json.loads(plan.read_text())
    assert data["criterion"] == "reap" and data["ratio"] == 0.5
    assert data["stats_sha256"] and data["model_fingerprint"]
    for layer in data["layers"]:
        assert len(layer["kept"]) == 4 and layer["kept"] == sorted(layer["kept"])
    applied = _run(mixtral, "--plan", plan, "--out", tmp_path / "a")
    direct = _run(mixtral, "--stats", stats, "--ratio", 0.5, "--criterion", "reap", "--out",
                  tmp_path / "b")
    assert applied.exit_code == 0 and direct.exit_code == 0, applied.output + direct.output
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    assert set(a.tensors) == set(b.tensors)
    assert all(_raw(a, k) == _raw(b, k) for k in a.tensors)


def test_grouped_routing_equal_drop_per_group_or_fallback(tiny_checkpoint, tmp_path):
    """DeepSeek-V3 tiny: 8 experts in n_group=2 groups. Removing 2 keeps the groups (one from
    each); removing 1 cannot, so the config falls back to n_group = topk_group = 1."""
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint("deepseek_v3")
    stats = _stats(tmp_path, folder)
    result = _run(folder, "--stats", stats, "--ratio", 0.25, "--criterion", "frequency",
                  "--out", tmp_path / "even")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "even" / "moekit_provenance.json").read_text())
    for layer in record["layers"]:
        assert sorted(j // 4 for j in layer["dropped"]) == [0, 1]
    config = json.loads((tmp_path / "even" / "config.json").read_text())
    assert (config["n_group"], config["topk_group"], config["n_routed_experts"]) == (2, 1, 6)

    result = _run(folder, "--stats", stats, "--ratio", 0.125, "--out", tmp_path / "odd")
    assert result.exit_code == 0, result.output
    assert "n_group=1" in " ".join(result.output.split())
    config = json.loads((tmp_path / "odd" / "config.json").read_text())
    assert (config["n_group"], config["topk_group"], config["n_routed_experts"]) == (1, 1, 7)
    record = json.loads((tmp_path / "odd" / "moekit_provenance.json").read_text())
    assert record["config_changes"] == {"n_group": 1, "topk_group": 1} and record["warnings"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "odd")
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_protect_keep_drop_and_sharding(mixtral, tmp_path):
    stats = _stats(tmp_path, mixtral)
    # the weakest expert of layer 0 by count would be dropped first, unless protected
    counts = [(7 * j + 3) % 11 for j in range(8)]
    weakest = min(range(8), key=lambda j: (counts[j], j))
    result = _run(mixtral, "--stats", stats, "--ratio", 0.25, "--criterion", "frequency",
                  "--protect", f"0:{weakest}", "--dry-run", "--plan-out", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "p.json").read_text())
    assert weakest in plan["layers"][0]["kept"] and weakest not in plan["layers"][0]["dropped"]

    (tmp_path / "drop.txt").write_text("# layer: experts\n0: 1, 2\n1: 7 0\n")
    result = _run(mixtral, "--drop", tmp_path / "drop.txt", "--out", tmp_path / "listed",
                  "--max-shard-size", "100KB")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "listed" / "moekit_provenance.json").read_text())
    assert [p["dropped"] for p in record["layers"]] == [[1, 2], [0, 7]]
    assert record["criterion"] == "explicit" and record["ratio"] == 0.25
    assert (tmp_path / "listed" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "listed").glob("model-*.safetensors"))) > 1

    (tmp_path / "keep.json").write_text(json.dumps({"*": [0, 2, 4, 6, 7, 5]}))
    result = _run(mixtral, "--keep", tmp_path / "keep.json", "--out", tmp_path / "kept")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "kept" / "moekit_provenance.json").read_text())
    assert all(p["kept"] == [0, 2, 4, 5, 6, 7] for p in record["layers"])


def test_budget_report_export_matches_stats(mixtral, tmp_path):
    import pandas as pd

    stats = _stats(tmp_path, mixtral)
    report = tmp_path / "budget.csv"
    result = _run(mixtral, "--stats", stats, "--ratio", 0.5, "--criterion", "frequency",
                  "--dry-run", "--export", report)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(report)
    for layer in (0, 1):
        counts = [(7 * j + 3) % 11 + layer for j in range(8)]
        removed = sum(sorted(counts)[:4]) / sum(counts)
        row = frame[frame.layer == layer].iloc[0]
        assert row.traffic_removed == pytest.approx(removed)
        assert row.saliency_removed == pytest.approx(removed)  # criterion = tokens here


BAD = {
    "ratio-one": (["--ratio", "1.0"], "outside [0, 1)"),
    "ratio-negative": (["--ratio", "-0.1"], "outside [0, 1)"),
    "below-top-k": (["--ratio", "0.9"], "top_k=2 but only 1 experts would remain"),
    "min-experts": (["--ratio", "0.5", "--min-experts", "6"], "--min-experts 6"),
    "bad-domain": (["--ratio", "0.25", "--domain", "klingon"], "no rows for domain"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_fail_in_one_line_and_write_nothing(case, mixtral, tmp_path):
    args, message = BAD[case]
    out = tmp_path / "out"
    result = _run(mixtral, "--stats", _stats(tmp_path, mixtral), *args, "--out", out)
    _assert_refused(result, message, out)


def test_stats_from_another_model_are_refused(mixtral, tiny_checkpoint, tmp_path):
    other = tiny_checkpoint("mixtral", seed=1)
    out = tmp_path / "out"
    result = _run(mixtral, "--stats", _stats(tmp_path, other), "--ratio", 0.25, "--out", out)
    _assert_refused(result, "not on this checkpoint", out)
    qwen = tiny_checkpoint("qwen3_moe")
    result = _run(mixtral, "--stats", _stats(tmp_path, qwen, "s1"), "--ratio", 0.25,
                  "--ignore-fingerprint", "--out", out)
    _assert_refused(result, "stats are for a qwen3_moe model", out)
    deeper = tiny_checkpoint("mixtral", num_hidden_layers=3)
    result = _run(mixtral, "--stats", _stats(tmp_path, deeper, "s2"), "--ratio", 0.25,
                  "--ignore-fingerprint", "--out", out)
    _assert_refused(result, "stats describe MoE layers [0, 1, 2]", out)
    wider = tiny_checkpoint("mixtral", num_local_experts=16)
    result = _run(mixtral, "--stats", _stats(tmp_path, wider, "s4"), "--ratio", 0.25,
                  "--ignore-fingerprint", "--out", out)
    _assert_refused(result, "16 experts", out)
    result = _run(mixtral, "--stats", _stats(tmp_path, other, "s3"), "--ratio", 0.25,
                  "--ignore-fingerprint", "--out", out)
    assert result.exit_code == 0, result.output


def test_bad_plan_and_existing_output_are_refused(mixtral, tmp_path):
    plan = tmp_path / "plan.json"
    result = _run(mixtral, "--stats", _stats(tmp_path, mixtral), "--ratio", 0.25, "--dry-run",
                  "--plan-out", plan)
    assert result.exit_code == 0, result.output
    data = json.loads(plan.read_text())
    data["layers"][0]["kept"][-1] = 99
    (tmp_path / "bad.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    _assert_refused(_run(mixtral, "--plan", tmp_path / "bad.json", "--out", out),
                    "expert 99 in layer 0", out)
    data = json.loads(plan.read_text())
    data["layers"][1]["layer"] = 7
    (tmp_path / "bad2.json").write_text(json.dumps(data))
    _assert_refused(_run(mixtral, "--plan", tmp_path / "bad2.json", "--out", out),
                    "layer 7", out)
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = _run(mixtral, "--plan", plan, "--out", out)
    assert result.exit_code != 0 and "exists and is not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _assert_refused(_run(mixtral, "--plan", plan, "--out", mixtral / "sub"), "overlaps",
                    mixtral / "sub")


def _assert_refused(result, message: str, out: Path) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    text = " ".join(" ".join(lines).split())
    assert len(lines) == 1 and text.startswith("error:") and message in text, result.output
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.moekit") for p in out.parent.iterdir())


def test_random_needs_no_stats_and_records_strict_json(mixtral, tmp_path):
    for name in ("a", "b"):
        result = _run(mixtral, "--criterion", "random", "--seed", 3, "--ratio", 0.25, "--out",
                      tmp_path / name)
        assert result.exit_code == 0, result.output

    def strict(constant: str) -> None:
        raise AssertionError(f"non-JSON constant {constant} in the provenance file")

    a, b = (json.loads((tmp_path / n / "moekit_provenance.json").read_text(),
                       parse_constant=strict) for n in ("a", "b"))
    assert a["seed"] == 3 and a["criterion"] == "random" and a["stats"]["sha256"] is None
    assert [p["kept"] for p in a["layers"]] == [p["kept"] for p in b["layers"]]
    assert a["budget"][0]["traffic_removed"] is None
