"""`moekit convert --dtype`: FP8-block and MXFP4 checkpoints decoded equal the independent
dequantization of tests/quant_support.py bit for bit (fp32) and its bf16 cast (bf16), load in
transformers with the same logits; a plain checkpoint is cast as `tensor.to(dtype)`; bad
requests are refused in one line with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from quant_support import CASES
from safetensors.torch import load_file
from typer.testing import CliRunner

from moekit.cli.app import app


def convert(*args: str) -> str:
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def same_tensors(ours: dict, theirs: dict, bits: bool = True) -> None:
    """Same names, dtypes and bytes (`bits`), or values (-0.0 == 0.0) when not `bits`."""
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        if bits:
            assert torch.equal(ours[key].view(torch.uint8), value.view(torch.uint8)), key
        else:
            assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_and_bf16_equal_the_independent_dequantization(case, quantized, tmp_path):
    q, deq = quantized(case)
    reference = load_file(deq / "model.safetensors")
    # compressed-tensors: the reference is the library's fake quantization, whose zeros may
    # carry the other sign than its decompression's; FP8 and MXFP4: bit for bit.
    bits = not case.endswith(("w4a16", "nvfp4"))
    convert(q, "--dtype", "fp32", "--out", tmp_path / "f32")
    same_tensors(load_file(tmp_path / "f32" / "model.safetensors"), reference, bits)
    convert(q, "--dtype", "bf16", "--out", tmp_path / "b16")
    same_tensors(load_file(tmp_path / "b16" / "model.safetensors"),
                 {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                  for k, v in reference.items()}, bits)
    config = json.loads((tmp_path / "b16" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    for name in ("tokenizer.json", "moekit_provenance.json", "README.md"):
        assert (tmp_path / "b16" / name).is_file(), name
    provenance = json.loads((tmp_path / "b16" / "moekit_provenance.json").read_text())
    assert provenance["operation"] == "convert" and provenance["dtype"] == "BF16"


@pytest.mark.parametrize("case", ["deepseek_v3-fp8", "gpt_oss-mxfp4"])
def test_output_loads_in_transformers_with_the_dequantized_logits(case, quantized, tmp_path):
    from transformers import AutoModelForCausalLM

    q, deq = quantized(case)
    convert(q, "--dtype", "fp32", "--out", tmp_path / "out")
    ids = torch.arange(3, 40).reshape(1, -1)
    logits = []
    for folder in (tmp_path / "out", deq):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_plain_checkpoint_is_cast_like_torch(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral")
    convert(source, "--dtype", "bf16", "--out", tmp_path / "out")
    reference = load_file(source / "model.safetensors")
    same_tensors(load_file(tmp_path / "out" / "model.safetensors"),
                 {k: v.to(torch.bfloat16) for k, v in reference.items()})
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dry_run_shows_counts_and_config_and_writes_nothing(quantized, tmp_path):
    q, _ = quantized("deepseek_v3-fp8")
    output = convert(q, "--dtype", "bf16", "--dry-run", "--json")
    summary = json.loads(output)
    assert summary["tensors_in"] > summary["tensors_out"] > 0
    assert summary["actions"]["dequantized"] > 0
    assert summary["bytes_out"] > summary["bytes_in"] > 0
    assert any("quantization_config (fp8) removed" in c for c in summary["config_changes"])
    assert "would write" in convert(q, "--dtype", "bf16", "--dry-run")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--dtype", "int8"], "--dtype 'int8' is not a format convert writes"),
    ([], "convert: nothing to do"),
    (["--dtype", "fp32"], "nothing to do"),
    (["--experts", "sideways"], "--experts 'sideways' is not a layout"),
])
def test_bad_requests_are_refused_in_one_line(args, message, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(tiny_checkpoint("mixtral")), *args,
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_quantization_is_refused(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "awq"
    shutil.copytree(tiny_checkpoint("mixtral"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["convert", str(folder), "--dtype", "bf16", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "quant_method 'awq' is not supported" in result.output
    assert not (tmp_path / "out").exists()


def test_fp8_input_scales_are_dropped_when_decoded(quantized, tmp_path):
    """Static activation scales (`X.input_scale`) are not part of the weight: decoding drops
    them, as moekit.formats does when it reads."""
    import shutil

    from safetensors.torch import save_file

    q, deq = quantized("qwen3_moe-fp8")
    folder = tmp_path / "with-input-scale"
    shutil.copytree(q, folder)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.input_scale"
    tensors[key] = torch.tensor([0.5])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    convert(folder, "--dtype", "fp32", "--out", tmp_path / "out")
    same_tensors(load_file(tmp_path / "out" / "model.safetensors"),
                 load_file(deq / "model.safetensors"))
