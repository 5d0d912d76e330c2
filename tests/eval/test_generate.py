"""`moekit eval --generate`: a copy-upcycled MoE continues every prompt exactly as its dense
source (an independent check: copying preserves the function), a pruned MoE parts from its
source somewhere, and the first differing token is where the reports mark it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.ops.generate import first_difference

runner = CliRunner()


@pytest.fixture(scope="module")
def prompts(sample_texts, tmp_path_factory):
    lines = []
    for path in sample_texts.values():
        words = path.read_text().split()
        lines += [" ".join(words[i:i + 6]) for i in range(0, 120, 20)]
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(model, ref, prompts, out):
    result = runner.invoke(app, ["eval", str(model), "--ref", str(ref), "--generate",
                                 str(prompts), "--max-new-tokens", "12", "--device", "cpu",
                                 "--generate-out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())["continuations"], result.output


def test_copy_upcycled_model_continues_like_its_dense_source(trained_checkpoint, prompts,
                                                               tmp_path):
    dense = trained_checkpoint("dense")
    moe = tmp_path / "moe"
    result = runner.invoke(app, ["upcycle", str(dense), "--arch", "qwen3_moe", "-e", "4", "-k",
                                 "2", "--method", "copy", "-o", str(moe)])
    assert result.exit_code == 0, result.output
    items, output = run(moe, dense, prompts, tmp_path / "gen.json")
    assert len(items) == 18
    assert all(item["diverge"] is None for item in items)
    assert all(item["model_ids"] == item["ref_ids"] and len(item["model_ids"]) == 12
               for item in items)
    assert "18 of 18 continuations identical" in output


def test_pruned_model_divergence_is_marked(trained_checkpoint, prompts, tmp_path):
    moe = trained_checkpoint("moe")
    pruned = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(moe), "--criterion", "random", "--ratio", "0.5",
                                 "--out", str(pruned)])
    assert result.exit_code == 0, result.output
    items, _ = run(pruned, moe, prompts, tmp_path / "gen.json")
    parted = [item for item in items if item["diverge"] is not None]
    assert parted, "pruning half the experts at random changed no continuation"
    for item in parted:
        at = item["diverge"]
        assert item["model_ids"][:at] == item["ref_ids"][:at]
        assert item["model_ids"][at] != item["ref_ids"][at]
        assert "⟦" in item["model_marked"] and item["model_marked"].endswith("⟧")
    markdown = tmp_path / "gen.md"
    result = runner.invoke(app, ["eval", str(pruned), "--ref", str(moe), "--generate",
                                 str(prompts), "--max-new-tokens", "12", "--device", "cpu",
                                 "--generate-out", str(markdown)])
    assert result.exit_code == 0
    text = markdown.read_text()
    assert f"{len(items) - len(parted)} of {len(items)} continuations identical" in text
    assert text.count("differs from token") == len(parted)


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_missing_prompt_file_is_one_line(trained_checkpoint, tmp_path):
    result = runner.invoke(app, ["eval", str(trained_checkpoint("moe")), "--generate",
                                 str(tmp_path / "nope.txt")])
    assert result.exit_code != 0 and "does not exist" in result.output
