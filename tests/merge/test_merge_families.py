"""`moekit merge` on tiny checkpoints of every registry family: the merged checkpoint loads
with AutoModelForCausalLM, has the new expert count and is physically smaller; merged weights
equal an independent computation from the source tensors; undefined merges fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import merge, stats_for
from tiny_models import TINY_MOE, VOCAB, read_config
from transformers import AutoModelForCausalLM

from moekit.families.layout import describe
from moekit.families.registry import first_value
from moekit.io.reader import Checkpoint

# Families whose routing replays from logits (calibrated grouping and fitting).
CALIBRATED = sorted(t for t in TINY_MOE if t not in ("llama4_text", "phimoe"))


def bytes_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def check_loads(source: Path, out: Path, experts_after: int) -> None:
    layout = describe(Checkpoint(source))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = read_config(out)
    text = config.get("text_config", config)
    assert first_value(text, layout.family.keys.num_experts) == experts_after
    assert bytes_of(out) < bytes_of(source)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("model_type", sorted(TINY_MOE))
def test_data_free_merge_loads_smaller(model_type, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(model_type)
    out = tmp_path / "merged"
    result = merge(source, "--stats", stats_for(tmp_path, source), "--ratio", "0.5", "--group",
                   "weight", "--method", "aligned", "--router", "usage", "--out", out)
    assert result.exit_code == 0, result.output
    check_loads(source, out, 4)
    record = json.loads((out / "moekit_provenance.json").read_text())
    assert record["operation"] == "merge" and record["experts_per_layer"]["after"] == 4
    assert (out / "README.md").exists() and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("model_type", CALIBRATED)
def test_calibrated_merge_loads_smaller(model_type, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(model_type)
    text = tmp_path / "calib.txt"
    text.write_text("def merge(a, b):\n    return a + b\n" * 200)
    out = tmp_path / "merged"
    result = merge(source, "--stats", stats_for(tmp_path, source), "--ratio", "0.25",
                   "--group", "hc-smoe", "--method", "fit", "--data", f"code={text}",
                   "--max-tokens", "256", "--seq-len", "64", "--out", out)
    assert result.exit_code == 0, result.output
    check_loads(source, out, 6)
    record = json.loads((out / "moekit_provenance.json").read_text())
    assert record["calibration"]["tokens"] == 256
    assert all(layer["reconstruction_error"] is not None for layer in record["layers"])


def test_merged_weights_are_the_independent_average(tiny_checkpoint, tmp_path):
    """Mixtral (per-expert) and gpt-oss (fused, transposed, interleaved, biases): every merged
    tensor equals the usage-weighted mean of its cluster computed from the raw source tensors;
    router rows follow --router usage."""
    for model_type in ("mixtral", "gpt_oss"):
        source = tiny_checkpoint(model_type)
        out = tmp_path / model_type
        plan_file = tmp_path / f"{model_type}.json"
        assert merge(source, "--stats", stats_for(tmp_path / f"s-{model_type}", source), "--ratio",
                     "0.5", "--group", "weight", "--method", "average", "--router", "usage",
                     "--plan-out", plan_file, "--out", out).exit_code == 0
        plan = json.loads(plan_file.read_text())
        before, after = load_file(source / "model.safetensors"), load_file(
            out / "model.safetensors")
        for p in plan["layers"]:
            for new, (cluster, weights) in enumerate(zip(p["clusters"], p["weights"],
                                                         strict=True)):
                for key in _expert_keys(model_type, p["layer"]):
                    parts = [before[key.format(j=j)] if "{j}" in key else before[key][j]
                             for j in cluster]
                    expected = sum(w * t for w, t in zip(weights, parts, strict=True))
                    got = after[key.format(j=new)] if "{j}" in key else after[key][new]
                    assert torch.allclose(got, expected, atol=1e-5), (key, new)


def _expert_keys(model_type: str, layer: int) -> list[str]:
    """Per-expert keys (with `{j}`) or tensors stacking experts on axis 0."""
    if model_type == "mixtral":
        base = f"model.layers.{layer}.block_sparse_moe."
        return [base + "experts.{j}." + w + ".weight" for w in ("w1", "w2", "w3")] + [
            base + "gate.weight"]
    base = f"model.layers.{layer}.mlp."
    return [base + k for k in ("experts.gate_up_proj", "experts.gate_up_proj_bias",
                               "experts.down_proj", "experts.down_proj_bias", "router.weight",
                               "router.bias")]


def test_quantised_experts_are_refused(tiny_checkpoint, tmp_path):
    """gpt-oss with MXFP4-style `_blocks`/`_scales` expert tensors: merging is not defined."""
    source = tmp_path / "mxfp4"
    shutil.copytree(tiny_checkpoint("gpt_oss"), source)
    tensors = load_file(source / "model.safetensors")
    for key in [k for k in tensors if k.endswith("experts.down_proj")]:
        value = tensors.pop(key)
        tensors[key + "_blocks"] = value.to(torch.uint8)
        tensors[key + "_scales"] = value[..., :1].to(torch.uint8)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    result = merge(source, "--stats", stats_for(tmp_path, source), "--ratio", "0.5", "--group",
                   "weight", "--method", "average", "--out", out)
    assert result.exit_code == 2, result.output
    assert "cannot merge" in result.output and "_blocks" in result.output
    assert not out.exists()


def test_input_scaled_family_refuses_calibrated_methods(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama4_text")
    out = tmp_path / "out"
    result = merge(source, "--stats", stats_for(tmp_path, source), "--ratio", "0.5",
                   "--method", "fit", "--group", "weight", "--out", out)
    assert result.exit_code == 2, result.output
    assert "scales the experts' input" in result.output and not out.exists()
