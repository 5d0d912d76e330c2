"""Quantized checkpoints (moekit.formats): FP8 blocks and MXFP4 are decoded as transformers and
the formats' specifications decode them; profile/eval, streamed and in memory, equal those of
an independent dequantization (tests/quant_support.py); inspect counts logical parameters;
prune keeps every kept expert byte for byte and writes no refit into a format it cannot
re-encode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from quant_support import CASES, E2M1
from safetensors.torch import load_file
from typer.testing import CliRunner

from moekit.calib.data import DataSource
from moekit.calib.spec import DataSpec
from moekit.cli.app import app
from moekit.formats import Logical, compressed, decode, logical_tensors
from moekit.formats import fp8_block as fp8
from moekit.io.reader import Checkpoint
from moekit.ops.evaluate import evaluate
from moekit.ops.inspect import inspect_checkpoint
from moekit.ops.profile import profile_model
from moekit.runtime.options import RunOptions

SETTINGS = dict(batch_size=3, run=RunOptions(device="cpu", dtype="float32"))


def _spec(sources: list[DataSource]) -> DataSpec:
    return DataSpec(tuple(sources), seq_len=24, max_tokens=150)
METHOD = {"fp8": "fp8", "mxfp4": "mxfp4", "w4a16": "compressed-tensors",
          "nvfp4": "compressed-tensors"}
FORMAT = {"fp8": fp8.NAME, "mxfp4": "mxfp4", "w4a16": "compressed-tensors/pack-quantized",
          "nvfp4": "compressed-tensors/nvfp4-pack-quantized"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[DataSource]:
    import os

    folder = tmp_path_factory.mktemp("quant-texts")
    (folder / "a.txt").write_text((os.__doc__ or "") * 2)
    return [DataSource("a", folder / "a.txt")]


def test_fp8_decode_equals_transformers_dequantization():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    torch.manual_seed(0)
    weight = (torch.randn(64, 96) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(4, 3) + 0.01
    logical = Logical("w", (64, 96), fp8.NAME, (), (16, 32))
    ours = decode(logical, [weight, scale])
    theirs = Fp8Dequantize(None)._dequantize_one(weight, scale, torch.float32)
    assert torch.equal(ours, theirs)


def test_fp8_partial_blocks_follow_the_spec():
    torch.manual_seed(1)
    weight = (torch.randn(40, 50) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 3) + 0.01  # blocks 16 x 24: the last row/column blocks are partial
    ours = decode(Logical("w", (40, 50), fp8.NAME, (), (16, 24)), [weight, scale])
    rows, cols = torch.arange(40) // 16, torch.arange(50) // 24
    assert torch.equal(ours, weight.float() * scale[rows[:, None], cols[None, :]])


def test_mxfp4_decode_equals_transformers_dequantization():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(2)
    blocks = torch.randint(0, 256, (3, 10, 2, 16), dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 10, 2), dtype=torch.uint8)
    logical = Logical("w", (3, 64, 10), "mxfp4", (), (1, 32))
    ours = decode(logical, [blocks, scales])
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert ours.shape == (3, 64, 10)
    assert torch.equal(ours, theirs)


def test_nvfp4_decode_is_the_library_decompression_within_bf16_of_its_fake_quantization(
        quantized):
    """NVFP4 (compressed-tensors `nvfp4-pack-quantized`): moekit's decode of every module
    equals the library's own decompressor called on the stored tensors, and is within bf16
    rounding (the decompressor unpacks to bf16) of the library's float32 fake quantization
    E2M1 x FP8 scale / global scale."""
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    q, _ = quantized("qwen3_moe-nvfp4")
    checkpoint = Checkpoint(q)
    modules = [t for t in logical_tensors(checkpoint).values()
               if t.format.endswith("nvfp4-pack-quantized")]
    assert modules
    for logical in modules:
        stored = [checkpoint.read(s.name) for s in logical.sources]
        ours = decode(logical, stored)
        state = dict(zip(logical.params, stored, strict=True))
        library = compressed._compressor("nvfp4-pack-quantized").decompress(state,
                                                                             logical.scheme)
        assert torch.equal(ours, library["weight"].float()), logical.name
        codes = torch.tensor(E2M1)[torch.stack(
            [state["weight_packed"] & 15, state["weight_packed"] >> 4], -1).long()]
        exact = dequantize(codes.reshape(logical.shape), state["weight_scale"].float(),
                           args=logical.scheme.weights,
                           global_scale=state["weight_global_scale"].float())
        assert ((ours - exact).abs() <= exact.abs() * 2 ** -8).all(), logical.name


@pytest.mark.parametrize("case", list(CASES))
def test_logical_view_and_inspect_count_values_not_bytes(case, quantized):
    q, deq = quantized(case)
    logical = logical_tensors(Checkpoint(q))
    assert {n: t.shape for n, t in logical.items()} == \
        {n: t.shape for n, t in logical_tensors(Checkpoint(deq)).items()}
    ours, plain = inspect_checkpoint(q), inspect_checkpoint(deq)
    kind = case.split("-")[1]
    assert ours.quant_method == METHOD[kind]
    assert plain.quant_method is None
    for field in ("total_params", "active_params", "routed_expert_params"):
        assert getattr(ours, field) == getattr(plain, field), field
    assert sum(ours.dtypes.values()) == ours.total_params
    assert ours.dtypes[FORMAT[kind]] > 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_profile_and_eval_equal_the_dequantized_copy(case, stream, quantized, sources):
    q, deq = quantized(case)
    ours = profile_model(q, _spec(sources), stream=stream, **SETTINGS)
    plain = profile_model(deq, _spec(sources), stream=False, **SETTINGS)
    assert ours.metadata["runtime"]["mode"] == ("stream" if stream else "memory")
    assert (ours.expert_stats["tokens"].to_numpy() == plain.expert_stats["tokens"].to_numpy()).all()
    np.testing.assert_allclose(ours.expert_stats["weight_sum"], plain.expert_stats["weight_sum"],
                               rtol=1e-5, atol=1e-6)
    loss = evaluate(q, _spec(sources), stream=stream, **SETTINGS).overall.loss
    plain_loss = evaluate(deq, _spec(sources), stream=False, **SETTINGS).overall.loss
    assert loss == pytest.approx(plain_loss, abs=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_prune_keeps_kept_experts_as_stored(case, quantized, sources, tmp_path):
    q, deq = quantized(case)
    stats = tmp_path / "prof"
    runner = CliRunner()
    result = runner.invoke(app, ["profile", str(q), "--data", f"a={sources[0].path}",
                                 "--max-tokens", "512", "--seq-len", "32",
                                 "--out", str(stats)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(q), "--stats", str(stats), "--ratio", "0.25",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / "moekit_provenance.json").read_text())
    src, dst = load_file(q / "model.safetensors"), load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((q / "config.json").read_text())["quantization_config"]
    checked = 0
    for layer in provenance["layers"]:
        for old, new in layer["old_to_new"].items():
            checked += _same_expert(src, dst, layer["layer"], int(old), new)
    assert checked > 0
    assert inspect_checkpoint(out).quant_method == inspect_checkpoint(q).quant_method


def _same_expert(src: dict, dst: dict, layer: int, old: int, new: int) -> int:
    """Compare expert `old` of the source with expert `new` of the output, stored bytes."""
    count = 0
    for key, value in src.items():
        marker = f"layers.{layer}.mlp.experts.{old}."
        if marker in key:
            other = dst[key.replace(marker, f"layers.{layer}.mlp.experts.{new}.")]
            assert torch.equal(value.view(torch.uint8), other.view(torch.uint8)), key
            count += 1
        elif f"layers.{layer}.mlp.experts." in key and key.split("experts.")[1][0].isalpha():
            assert torch.equal(value[old].view(torch.uint8), dst[key][new].view(torch.uint8)), key
            count += 1
    return count


def test_prune_data_keeps_experts_it_cannot_reencode_as_stored(quantized, sources, tmp_path):
    """compressed-tensors experts are not re-encoded (tests/formats/test_quantized_write.py covers
    the FP8-block and MXFP4 refits): refits off with a note, asking for them refused."""
    q, _ = quantized("qwen3_moe-w4a16")
    runner = CliRunner()
    base = ["prune", str(q), "--data", f"a={sources[0].path}", "--max-tokens", "512",
            "--seq-len", "32",
            "--ratio", "0.25"]
    refused = runner.invoke(app, [*base, "--compensate", "--out", str(tmp_path / "x")])
    assert refused.exit_code != 0
    assert "stored quantized (compressed-tensors/pack-quantized)" in \
        " ".join(refused.output.split())
    assert not (tmp_path / "x").exists()
    trim = runner.invoke(app, [*base[:-2], "--keep-params", "0.5", "--out", str(tmp_path / "t")])
    assert trim.exit_code != 0
    assert "does not trim quantized experts" in " ".join(trim.output.split())
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "y")])
    assert result.exit_code == 0, result.output
    assert "refits of the kept experts are off" in " ".join(result.output.split())
    provenance = json.loads((tmp_path / "y" / "moekit_provenance.json").read_text())
    src, dst = load_file(q / "model.safetensors"), load_file(tmp_path / "y" / "model.safetensors")
    for layer in provenance["layers"]:
        for old, new in layer["old_to_new"].items():
            assert _same_expert(src, dst, layer["layer"], int(old), new) > 0


def test_unknown_quantization_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "awq"
    shutil.copytree(tiny_checkpoint("mixtral"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code != 0
    assert "quant_method 'awq' is not supported" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", ["gpt_oss-mxfp4", "deepseek_v3-fp8"])
def test_memory_budget_counts_the_decoded_weights(case, quantized):
    """`--max-memory auto` decides on the bytes the model takes once decoded (gpt-oss-20b:
    ~42 GB in bf16, not the 13 GB its MXFP4 files take)."""
    from moekit.runtime.engine import open_model

    q, deq = quantized(case)
    ours = open_model(q, device="cpu", dtype="float32", stream=True).sizes
    plain = open_model(deq, device="cpu", dtype="float32", stream=True).sizes
    assert ours == plain
    assert sum(ours.layers) > sum(p.stat().st_size for p in q.glob("*.safetensors"))
