"""inspect on header-only checkpoints with the real models' configs and Hub tensor layouts
(tests/real_checkpoints.py) gives the parameter counts their authors publish; DeepSeek-V3's
multi-token-prediction layer is counted apart and dropped, with the config, by prune."""

from __future__ import annotations

import json

import pytest
from real_checkpoints import write_real
from safetensors.torch import load_file
from support import with_mtp_layer
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.ops.inspect import inspect_checkpoint

# name: (the inspect field the authors' "active" count matches, tolerance). Mistral, Qwen, OLMoE,
# Phi and DeepSeek count the whole embedding table as active; OpenAI counts one row of it
# (gpt-oss-20b: 4.19 B with the table, 3.61 B without). DeepSeek's "37B activated" is rounded
# from 37.55 B (1.5 %); "3.3B" (Qwen3-30B-A3B: 3.35 B) and "1.3B" (OLMoE: 1.28 B) are rounded
# to two digits, hence 2 %.
CATALOGUE = {
    "gpt-oss-20b": ("active_params_no_embedding", 0.01),
    "gpt-oss-120b": ("active_params_no_embedding", 0.01),
    "deepseek-v3": ("active_params", 0.015),
    "mixtral-8x7b": ("active_params", 0.01),
    "qwen3-30b-a3b": ("active_params", 0.02),
    "qwen3-235b-a22b": ("active_params", 0.01),
    "olmoe-1b-7b": ("active_params", 0.02),
    "phi-3.5-moe": ("active_params", 0.01),
}


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_inspect_matches_published_counts(name, tmp_path):
    folder, published = write_real(name, tmp_path / name)
    if (folder / "model.safetensors").stat().st_blocks * 512 > 1 << 24:
        pytest.skip("this filesystem does not keep sparse files sparse")
    report = inspect_checkpoint(folder)
    field, tolerance = CATALOGUE[name]
    assert report.total_params == pytest.approx(published["total"], rel=0.01)
    assert getattr(report, field) == pytest.approx(published["active"], rel=tolerance)
    if "mtp" in published:
        assert report.mtp_layers == [61]
        assert report.mtp_params == pytest.approx(published["mtp"], rel=0.05)
        assert 61 not in report.moe_layers and len(report.moe_layers) == 58
    quantization = json.loads((folder / "config.json").read_text()).get("quantization_config")
    assert report.quant_method == (quantization or {}).get("quant_method")


@pytest.fixture()
def with_mtp(tiny_checkpoint, tmp_path):
    """A tiny DeepSeek-V3 (3 layers) with an MTP block stored as layer 3, as the Hub does."""
    folder = with_mtp_layer(tiny_checkpoint("deepseek_v3"), tmp_path / "with-mtp")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return folder


def test_mtp_layer_is_apart_and_dropped_by_prune(with_mtp, tmp_path, sample_texts):
    layout = describe(Checkpoint(with_mtp))
    assert [m.index for m in layout.mtp_layers] == [3]
    assert [m.index for m in layout.moe_layers] == [1, 2]
    runner = CliRunner()
    text = next(iter(sample_texts.values()))
    stats = tmp_path / "prof"
    result = runner.invoke(app, ["profile", str(with_mtp), "--data", f"d={text}",
                                 "--max-tokens", "2048", "--seq-len", "64", "--out", str(stats)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(with_mtp), "--stats", str(stats), "--ratio", "0.25",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    pruned = load_file(out / "model.safetensors")
    assert not any(k.startswith("model.layers.3.") for k in pruned)
    assert any(k.startswith("model.layers.2.mlp.experts.5.") for k in pruned)
    assert not any(k.startswith("model.layers.2.mlp.experts.6.") for k in pruned)
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["n_routed_experts"] == 6
    provenance = json.loads((out / "moekit_provenance.json").read_text())
    assert any("multi-token-prediction" in w for w in provenance["warnings"])
    assert sorted(int(layer["layer"]) for layer in provenance["layers"]) == [1, 2]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads: config and tensors agree
