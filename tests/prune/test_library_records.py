"""The library writes its own records: prune_checkpoint, merge_checkpoint and
convert_checkpoint called from Python (no CLI) leave `moekit_provenance.json` and a model card
that describe what was written; an `evaluate` hook adds its numbers before the rename."""

from __future__ import annotations

import json
from pathlib import Path

from support import doc_corpus, stats_for

from moekit.calib.spec import DataSpec
from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.ops.convert import convert_checkpoint
from moekit.ops.evaluate import evaluate as evaluate_model
from moekit.ops.merge import merge_checkpoint
from moekit.ops.merge.run import choose_merge_plan
from moekit.ops.prune import prune_checkpoint
from moekit.ops.prune.select import build_plan


def _records(out: Path) -> tuple[dict, str]:
    return (json.loads((out / "moekit_provenance.json").read_text()),
            (out / "README.md").read_text())


def test_prune_checkpoint_writes_provenance_and_card(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("mixtral")
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    drop = {layer.index: [1, 3] for layer in layout.moe_layers}
    plan = build_plan(layout, model_fingerprint(checkpoint, layout), drop=drop)
    corpus = doc_corpus(tmp_path)
    seen: list[Path] = []

    def evaluate(staging: Path) -> dict:
        assert (staging / "config.json").is_file()  # weights and config are written first
        seen.append(staging)
        data = DataSpec((corpus,), seq_len=32, max_tokens=256)
        return evaluate_model(staging, data, folder).to_dict()

    out = tmp_path / "out"
    result = prune_checkpoint(folder, plan, out, source_name="org/tiny-mixtral",
                              evaluate=evaluate)
    record, card = _records(out)
    assert seen and seen[0] != out
    assert record["operation"] == "prune" and record["source"] == "org/tiny-mixtral"
    assert record["command"] is None  # not run by the moekit command
    assert record["evaluation"] == result.extra["evaluation"]
    assert record["evaluation"]["overall"]["tokens"] > 0
    assert {p["layer"]: p["dropped"] for p in record["layers"]} == drop
    assert record["experts_per_layer"]["after"] == layout.moe_layers[0].num_experts - 2
    assert "base_model: \"org/tiny-mixtral\"" in card and "## Evaluation" in card


def test_merge_checkpoint_writes_provenance_and_card(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("mixtral")
    stats = stats_for(tmp_path, folder)
    plan, _ = choose_merge_plan(folder, stats=stats, ratio=0.5, group="weight",
                                method="average", router="centre", criterion="ean",
                                plan_in=None)
    out = tmp_path / "merged"
    merge_checkpoint(folder, plan, out, stats_folder=stats)
    record, card = _records(out)
    assert record["operation"] == "merge" and record["source"] == str(folder)
    assert record["stats"]["folder"] == str(stats)
    assert record["evaluation"] is None
    assert [p["clusters"] for p in record["layers"]] == [p.clusters for p in plan.layers]
    assert "merged" in card


def test_convert_checkpoint_writes_provenance_and_card(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("mixtral")
    out = tmp_path / "converted"
    convert_checkpoint(folder, out, dtype="BF16")
    record, card = _records(out)
    assert record["operation"] == "convert" and record["dtype"] == "BF16"
    assert record["scope"] is None  # nothing quantized
    assert record["tensors_in"] == len(Checkpoint(folder).tensors)
    assert "converted (dtype BF16)" in card
