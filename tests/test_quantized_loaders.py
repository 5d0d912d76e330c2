"""moekit's quantized outputs load with transformers' own loaders for their formats on CPU:
the FP8 loader (`FineGrainedFP8Config`) and the MXFP4 loader (`Mxfp4Config`), both in their
dequantize mode (their kernels need a GPU or triton). The logits equal those of the same
folder converted by moekit to float32 (`convert --dtype fp32`) and loaded plain.

FP8 sources use 8x8 blocks here: transformers derives the block from the scale grid
(rows // grid rows), so partial edge blocks (e.g. 16x16 blocks over 24 rows) decode wrongly in
it or are refused (DeepSeek-V3's kv_a_proj_with_mqa [576, 7168])."""

from __future__ import annotations

import pytest
import torch
from quant_support import quantize_fp8_block, quantize_mxfp4
from typer.testing import CliRunner

from moekit.cli.app import app

IDS = torch.arange(3, 40).reshape(1, -1)


def run(*args: object) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def logits(folder, quantized: str | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    extra = {}
    if quantized == "fp8":
        extra["quantization_config"] = FineGrainedFP8Config(dequantize=True)
    elif quantized == "mxfp4":
        extra["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def sources(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    fp8 = quantize_fp8_block(tiny_checkpoint("deepseek_v3"), root / "fp8", (8, 8))
    return {"fp8": (tiny_checkpoint("deepseek_v3"), fp8),
            "mxfp4": (tiny_checkpoint("gpt_oss"), quantize_mxfp4(tiny_checkpoint("gpt_oss"),
                                                                  root / "mxfp4"))}


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
@pytest.mark.parametrize("operation", ["convert", "prune", "merge"])
def test_output_loads_in_the_transformers_loader_of_its_format(fmt, operation, sources,
                                                               tmp_path):
    plain, quantized = sources[fmt]
    out = tmp_path / "out"
    if operation == "convert":
        run("convert", plain, "--quantize", fmt, "--out", out)
    elif operation == "prune":
        run("prune", quantized, "--criterion", "random", "--ratio", "0.25", "--out", out)
    else:
        run("merge", quantized, "--criterion", "random", "--ratio", "0.25", "--group", "weight",
            "--method", "average", "--out", out)
    run("convert", out, "--dtype", "fp32", "--out", tmp_path / "fp32")
    ours = logits(tmp_path / "fp32")
    theirs = logits(out, fmt)
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-5), (theirs - ours).abs().max()
