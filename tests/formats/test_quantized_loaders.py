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


def load(folder, quantized: str | None = None):
    """The model of `folder` in transformers, through its FP8 / MXFP4 loader when asked."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    extra = {}
    if quantized == "fp8":
        extra["quantization_config"] = FineGrainedFP8Config(dequantize=True)
    elif quantized == "mxfp4":
        extra["quantization_config"] = Mxfp4Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def logits(folder, quantized: str | None = None) -> torch.Tensor:
    with torch.no_grad():
        return load(folder, quantized)(IDS).logits


def parameters(folder, quantized: str | None = None) -> list[torch.Tensor]:
    return [p.detach() for _, p in sorted(load(folder, quantized).named_parameters())]


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


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_merge_bf16_experts_loads_and_equals_the_plain_merge(fmt, sources, tmp_path):
    """`merge --bf16-experts`: every expert of a merged layer written as bf16, equal to the
    bf16 cast of the same merge on the dequantized copy; the config names the expert modules
    as not converted, and transformers' own loader takes the mixed checkpoint."""
    import json

    from safetensors.torch import load_file

    _, quantized = sources[fmt]
    plan = tmp_path / "plan.json"
    run("merge", quantized, "--criterion", "random", "--ratio", "0.25", "--group", "weight",
        "--method", "average", "--plan-out", plan, "--bf16-experts", "--out", tmp_path / "out")
    run("convert", quantized, "--dtype", "fp32", "--out", tmp_path / "deq")
    run("merge", tmp_path / "deq", "--plan", plan, "--ignore-fingerprint",
        "--out", tmp_path / "plain")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    experts = [k for k in plain if ".mlp.experts." in k and "layers.0." not in k
               or k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts
    for key in experts:
        assert ours[key].dtype == (torch.bfloat16 if "bias" not in key else plain[key].dtype)
        assert torch.equal(ours[key].float(), plain[key].to(ours[key].dtype).float()), key
    assert not any(k.endswith(("weight_scale_inv", "_blocks", "_scales")) and ".experts." in k
                   for k in ours)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    layers = {p["layer"] for p in json.loads(plan.read_text())["layers"]}
    assert {f"model.layers.{i}.mlp.experts" for i in layers} <= \
        set(config["modules_to_not_convert"])
    # transformers keeps the not-converted experts in bf16 and computes them so: equal
    # parameters, logits within bf16 rounding of the float32 conversion's
    run("convert", tmp_path / "out", "--dtype", "fp32", "--out", tmp_path / "fp32")
    assert all(torch.equal(a.float(), b.float()) for a, b in
               zip(parameters(tmp_path / "out", fmt), parameters(tmp_path / "fp32"), strict=True))
    ours_logits, theirs = logits(tmp_path / "fp32"), logits(tmp_path / "out", fmt)
    assert torch.allclose(theirs, ours_logits, rtol=0, atol=2e-3)
