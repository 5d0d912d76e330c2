"""`moekit convert --experts fused|per-expert`: the Hub's per-expert keys -> transformers 5's
fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` -> per-expert gives back every tensor
byte for byte (name, dtype, shape, bytes); the fused checkpoint gives the same logits in
transformers; combined with --dtype the fused tensors are cast; fused-only families and dense
models are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from moekit.cli.app import app


def convert(*args: object) -> str:
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def same_in_transformers(folder, reference) -> None:
    """Both load in transformers to equal parameters (every in-memory tensor) and logits."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()
              for f in (folder, reference)]
    states = [m.state_dict() for m in models]
    assert sorted(states[0]) == sorted(states[1])
    for key, value in states[1].items():
        assert torch.equal(states[0][key], value), key
    with torch.no_grad():
        ids = torch.arange(3, 40).reshape(1, -1)
        torch.testing.assert_close(models[0](ids).logits, models[1](ids).logits,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_per_expert_fused_per_expert_is_byte_identical(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    convert(source, "--experts", "fused", "--out", tmp_path / "fused")
    fused = load_file(tmp_path / "fused" / "model.safetensors")
    experts = [k for k in fused if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 2 * 2 and not any(".experts.0." in k for k in fused)
    convert(tmp_path / "fused", "--experts", "per-expert", "--out", tmp_path / "back")
    before, after = (safe_open(str(f / "model.safetensors"), "pt") for f in
                     (source, tmp_path / "back"))
    assert sorted(before.keys()) == sorted(after.keys())
    assert before.metadata() == after.metadata()
    for key in before.keys():
        a, b = before.get_tensor(key), after.get_tensor(key)
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key
    same_in_transformers(tmp_path / "fused", source)


def test_fused_layout_is_transformers_in_memory_layout(tiny_checkpoint, tmp_path):
    """gate_up_proj[j] = concat(w1_j, w3_j), down_proj[j] = w2_j (transformers' conversion)."""
    source = tiny_checkpoint("mixtral")
    convert(source, "--experts", "fused", "--out", tmp_path / "fused")
    plain, fused = load_file(source / "model.safetensors"), load_file(
        tmp_path / "fused" / "model.safetensors")
    base = "model.layers.1.block_sparse_moe.experts"
    for j in range(8):
        gate_up = torch.cat([plain[f"{base}.{j}.w1.weight"], plain[f"{base}.{j}.w3.weight"]])
        assert torch.equal(fused[f"{base}.gate_up_proj"][j], gate_up)
        assert torch.equal(fused[f"{base}.down_proj"][j], plain[f"{base}.{j}.w2.weight"])


def test_experts_with_dtype_cast_the_fused_tensors(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen3_moe")
    convert(source, "--experts", "fused", "--out", tmp_path / "f32")
    convert(source, "--experts", "fused", "--dtype", "bf16", "--out", tmp_path / "b16")
    f32, b16 = (load_file(tmp_path / n / "model.safetensors") for n in ("f32", "b16"))
    assert sorted(f32) == sorted(b16)
    for key, value in f32.items():
        assert torch.equal(b16[key], value.to(torch.bfloat16)), key
    assert json.loads((tmp_path / "b16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("family, args, message", [
    ("gpt_oss", ["--experts", "per-expert"], "stores its experts fused only"),
    ("gpt_oss", ["--experts", "fused"], "nothing to do"),
    ("mixtral", ["--experts", "per-expert"], "nothing to do"),
    ("qwen3", ["--experts", "fused"], "is a dense model"),
])
def test_impossible_layouts_are_refused(family, args, message, tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["convert", str(tiny_checkpoint(family)), *args,
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []
