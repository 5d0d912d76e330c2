"""`moekit convert --quantize fp8`: decoder linear weights as FP8 E4M3 with 128x128 block scales
equal tests/quant_support.py's independent block quantizer bit for bit; `--quantize fp8` then
`--dtype bf16` gives the source back within FP8 rounding; moekit's profile and eval on the FP8
output equal those on its independent dequantization; bad requests are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from quant_support import dequantize_fp8_block, quantize_fp8_block
from safetensors.torch import load_file
from typer.testing import CliRunner

from moekit.calib.data import DataSource
from moekit.calib.spec import DataSpec
from moekit.cli.app import app
from moekit.ops.evaluate import evaluate
from moekit.ops.profile import profile_model
from moekit.runtime.options import RunOptions

SETTINGS = dict(batch_size=3, run=RunOptions(device="cpu", dtype="float32"))


def _spec(sources: list[DataSource]) -> DataSpec:
    return DataSpec(tuple(sources), seq_len=24, max_tokens=150)


def convert(*args: object) -> str:
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_fp8_equals_the_independent_quantizer(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    convert(source, "--quantize", "fp8", "--out", tmp_path / "ours")
    theirs = quantize_fp8_block(source, tmp_path / "theirs", (128, 128))
    ours_t, theirs_t = (load_file(f / "model.safetensors") for f in (tmp_path / "ours", theirs))
    assert sorted(ours_t) == sorted(theirs_t)
    for key, value in theirs_t.items():
        assert ours_t[key].dtype == value.dtype, key
        assert torch.equal(ours_t[key].view(torch.uint8), value.view(torch.uint8)), key
    config = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert config.pop("modules_to_not_convert")[0] == "lm_head"
    assert config == json.loads((theirs / "config.json").read_text())["quantization_config"]


def test_fp8_then_bf16_round_trips_within_fp8_rounding(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen3_moe")
    convert(source, "--quantize", "fp8", "--out", tmp_path / "q")
    convert(tmp_path / "q", "--dtype", "bf16", "--out", tmp_path / "back")
    before, after = (load_file(f / "model.safetensors") for f in (source, tmp_path / "back"))
    quantized = load_file(tmp_path / "q" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        back = after[key].float()
        scale_key = key.removesuffix(".weight") + ".weight_scale_inv"
        if scale_key not in quantized:
            assert torch.equal(back, value.to(torch.bfloat16).float()), key
            continue
        # E4M3: 3 mantissa bits (half-step 2^-4 relative), subnormal step 2^-9 x scale;
        # then bf16 (half-step 2^-8 relative).
        scale = quantized[scale_key].max()
        bound = value.abs() * (2 ** -4 + 2 ** -7) + scale * 2 ** -10
        assert ((back - value).abs() <= bound).all(), key


def test_moekit_profile_and_eval_equal_the_dequantized_copy(tiny_checkpoint, tmp_path):
    import os

    (tmp_path / "a.txt").write_text((os.__doc__ or "") * 2)
    sources = [DataSource("a", tmp_path / "a.txt")]
    q = tmp_path / "q"
    convert(tiny_checkpoint("deepseek_v3"), "--quantize", "fp8", "--out", q)
    deq = dequantize_fp8_block(q, tmp_path / "deq")
    plain = profile_model(deq, _spec(sources), stream=False, **SETTINGS)
    loss = evaluate(deq, _spec(sources), stream=False, **SETTINGS).overall.loss
    for stream in (False, True):
        ours = profile_model(q, _spec(sources), stream=stream, **SETTINGS)
        assert (ours.expert_stats["tokens"].to_numpy()
                == plain.expert_stats["tokens"].to_numpy()).all()
        np.testing.assert_allclose(ours.expert_stats["weight_sum"],
                                   plain.expert_stats["weight_sum"], rtol=1e-5, atol=1e-6)
        assert evaluate(q, _spec(sources), stream=stream, **SETTINGS).overall.loss == pytest.approx(
            loss, abs=1e-4)


def test_experts_only_keeps_attention_and_names_it(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint("mixtral"), "--quantize", "fp8", "--quantize-layers", "experts",
            "--out", tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    fp8 = {k for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn}
    assert fp8 and all(".block_sparse_moe.experts." in k for k in fp8)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    kept = json.loads((tmp_path / "q" / "config.json").read_text())[
        "quantization_config"]["modules_to_not_convert"]
    assert "model.layers.0.self_attn.q_proj" in kept
    assert "model.layers.0.block_sparse_moe.gate" in kept


@pytest.mark.parametrize("family, args, message", [
    ("mixtral", ["--quantize", "fp8", "--dtype", "bf16"],
     "--dtype and --quantize are given together"),
    ("mixtral", ["--quantize", "int4"], "--quantize 'int4' is not a format convert writes"),
    ("gpt_oss", ["--quantize", "fp8", "--quantize-layers", "experts"], "no experts weight"),
    ("mixtral", ["--dtype", "bf16", "--quantize-layers", "experts"], "needs --quantize fp8"),
    ("mixtral", ["--quantize", "fp8", "--quantize-layers", "mlp"], "is linear or experts"),
])
def test_bad_quantize_requests_are_refused(family, args, message, tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["convert", str(tiny_checkpoint(family)), *args,
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def test_quantizing_a_quantized_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    q = quantize_fp8_block(tiny_checkpoint("qwen3_moe"), tmp_path / "q")
    result = CliRunner().invoke(app, ["convert", str(q), "--quantize", "fp8", "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "is already quantized (fp8)" in result.output
    assert not (tmp_path / "out").exists()
