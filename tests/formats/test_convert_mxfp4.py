"""`moekit convert --quantize mxfp4`: gpt-oss' fused experts as MXFP4 blocks + scales, equal to
tests/quant_support.py's quantizer (written from the OCP MX spec) bit for bit; the round trip
through `--dtype fp32` is within MXFP4 rounding; bad requests are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from quant_support import quantize_mxfp4
from safetensors.torch import load_file
from typer.testing import CliRunner

from moekit.cli.app import app


def convert(*args: object) -> str:
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def test_mxfp4_equals_the_independent_quantizer(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("gpt_oss")
    convert(source, "--quantize", "mxfp4", "--out", tmp_path / "ours")
    theirs = quantize_mxfp4(source, tmp_path / "theirs")
    ours_t, theirs_t = (load_file(f / "model.safetensors") for f in (tmp_path / "ours", theirs))
    assert sorted(ours_t) == sorted(theirs_t)
    assert any(k.endswith("_blocks") for k in ours_t)
    for key, value in theirs_t.items():
        assert ours_t[key].dtype == value.dtype, key
        assert torch.equal(ours_t[key].view(torch.uint8), value.view(torch.uint8)), key
    config = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "mxfp4"
    kept = config["modules_to_not_convert"]
    assert "lm_head" in kept and "model.layers.0.mlp.router" in kept
    assert not any("experts" in k for k in kept)


def test_mxfp4_then_fp32_is_within_mxfp4_rounding(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("gpt_oss")
    convert(source, "--quantize", "mxfp4", "--out", tmp_path / "q")
    convert(tmp_path / "q", "--dtype", "fp32", "--out", tmp_path / "back")
    before, after = (load_file(f / "model.safetensors") for f in (source, tmp_path / "back"))
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        back, value = after[key], value.float()
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert torch.equal(back, value), key
            continue
        groups = value.transpose(1, 2).reshape(*value.shape[:1], value.shape[2], -1, 32)
        step = torch.exp2(torch.floor(torch.log2(groups.abs().amax(-1))) - 2)  # 2^X per group
        err = (back - value).transpose(1, 2).reshape(groups.shape).abs()
        assert (err <= 2 * step[..., None]).all(), key  # half-spacing, or saturation above 6


@pytest.mark.parametrize("family, args, message", [
    ("mixtral", ["--quantize", "mxfp4"], "does not store its experts as fused"),
    ("gpt_oss", ["--quantize", "mxfp4", "--quantize-layers", "linear"],
     "--quantize mxfp4 stores the routed experts only"),
])
def test_bad_mxfp4_requests_are_refused(family, args, message, tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["convert", str(tiny_checkpoint(family)), *args,
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []
