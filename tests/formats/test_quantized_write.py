"""Experts changed by merge or a prune refit are written back in the source's quantized format
(moekit/surgery/stored.py): re-encoded FP8 blocks or MXFP4, equal bit for bit to quantizing
(tests/quant_support.py, from the specs) what the same operation writes from the independent
dequantized copy; experts that do not change keep their stored bytes. MXFP4 encoding follows
the OCP MX spec and is the exact inverse of decoding for representable values."""

from __future__ import annotations

import json

import pytest
import torch
from quant_support import mxfp4_reference, quantize_fp8_block, quantize_mxfp4
from safetensors.torch import load_file
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.formats import Logical, decode, fp8_block, mxfp4

CASES = ["deepseek_v3-fp8", "qwen3_moe-fp8", "gpt_oss-mxfp4"]


def run(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _logical(shape: tuple[int, ...]) -> Logical:
    return Logical("w", shape, mxfp4.NAME, (), (1, 32))


def test_mxfp4_encode_equals_the_spec_reference():
    torch.manual_seed(3)
    values = torch.randn(3, 96, 5) * torch.logspace(-3, 3, 5)  # groups of very different range
    values[0, :32, 0] = 0.0  # an all-zero group
    values[1, :32, 1] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] * 4) * 2 ** -3
    blocks, scales = mxfp4.encode(values)
    theirs_blocks, theirs_scales = mxfp4_reference(values.transpose(1, 2))
    assert torch.equal(scales, theirs_scales)
    assert torch.equal(blocks, theirs_blocks)
    # ties to even: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4,
    # 7 -> 6 (saturated), with the group's scale 2^(floor(log2 7) - 2 - 3) = 2^-3
    back = decode(_logical(values.shape), [blocks, scales])
    assert back[1, :8, 1].tolist() == [x * 2 ** -3 for x in (0, 1, 1, 2, 2, 4, 4, 6)]


def test_mxfp4_encode_inverts_decode_and_stays_within_rounding():
    torch.manual_seed(4)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), dtype=torch.uint8)
    scales = torch.randint(1, 254, (2, 6, 3), dtype=torch.uint8)
    scales[0, 0, 0] = 0  # the smallest scale, 2^-127
    blocks[1, 1, 1] = torch.tensor([0x11, 0x99] * 8, dtype=torch.uint8)  # only +-0.5: X moves
    values = decode(_logical((2, 96, 6)), [blocks, scales])
    again = mxfp4.encode(values)
    assert torch.equal(decode(_logical((2, 96, 6)), list(again)), values)
    assert torch.equal(decode(_logical((2, 96, 6)), list(again)).signbit(), values.signbit())
    x = torch.randn(2, 64, 4) * 10
    q = decode(_logical(x.shape), list(mxfp4.encode(x)))
    groups = x.transpose(1, 2).reshape(2, 4, 2, 32)
    step = torch.exp2(torch.floor(torch.log2(groups.abs().amax(-1))) - 2)  # 2^X
    err = (q - x).transpose(1, 2).reshape(2, 4, 2, 32).abs()
    # half the E2M1 spacing (at most 1 x 2^X below 6) or the saturation (values up to 8 x 2^X)
    assert (err <= 2 * step[..., None]).all()
    with pytest.raises(Exception, match="multiple of 32"):
        mxfp4.encode(torch.zeros(1, 40, 2))


def test_fp8_encode_keeps_a_bf16_scale_consistent():
    torch.manual_seed(5)
    values = torch.randn(2, 40, 50) * 3
    weight, scale = fp8_block.encode(values, (16, 24), torch.bfloat16)
    assert weight.shape == (2, 40, 50) and scale.shape == (2, 3, 3)
    assert scale.dtype == torch.bfloat16 and not weight.float().isnan().any()
    back = decode(Logical("w", (2, 40, 50), fp8_block.NAME, (), (16, 24)), [weight, scale])
    assert ((back - values).abs() <= values.abs() * 2 ** -4 + scale.float().max() * 2 ** -9).all()


def _stats(q, sources_path, folder):
    run("profile", q, "--data", f"a={sources_path}", "--max-tokens", "512", "--seq-len", "32",
        "--out", folder)
    return folder


def _independent(case, deq_out, root):
    """The independent quantization of a float32 output, as the quantized source is stored."""
    if case.endswith("mxfp4"):
        return quantize_mxfp4(deq_out, root)
    return quantize_fp8_block(deq_out, root, (16, 24) if case.startswith("qwen3") else (16, 16))


@pytest.mark.parametrize("case", CASES)
def test_merge_writes_merged_experts_in_the_source_format(case, quantized, sample_texts,
                                                          tmp_path):
    q, deq = quantized(case)
    text = next(iter(sample_texts.values()))
    stats = _stats(q, text, tmp_path / "prof")
    plan = tmp_path / "plan.json"
    run("merge", q, "--stats", stats, "--ratio", "0.25", "--group", "weight", "--method",
        "average", "--plan-out", plan, "--out", tmp_path / "ours")
    run("merge", deq, "--plan", plan, "--ignore-fingerprint", "--out", tmp_path / "plain")
    theirs = _independent(case, tmp_path / "plain", tmp_path / "theirs")
    provenance = json.loads((tmp_path / "ours" / "moekit_provenance.json").read_text())
    assert any("re-encoded as" in w for w in provenance["warnings"])
    assert "re-encoded as" in (tmp_path / "ours" / "README.md").read_text()
    ours_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert ours_config["quantization_config"] == \
        json.loads((q / "config.json").read_text())["quantization_config"]
    src = load_file(q / "model.safetensors")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    ref = load_file(theirs / "model.safetensors")
    layers = json.loads(plan.read_text())["layers"]
    merged_rows = kept_rows = 0
    for layer in layers:
        for new, cluster in enumerate(layer["clusters"]):
            for key in ours:
                where = _expert(key, layer["layer"], new)
                if where is None:
                    continue
                mine, old_key, index = ours[key], key, new
                if where == "fused":
                    mine = mine[new]
                if len(cluster) > 1:  # merged: the independent quantization of the plain merge
                    other = ref[key][new] if where == "fused" else ref[key]
                    merged_rows += 1
                else:  # unchanged: the source's bytes
                    if where == "fused":
                        other = src[key][cluster[0]]
                    else:
                        old_key = key.replace(f"experts.{index}.", f"experts.{cluster[0]}.")
                        other = src[old_key]
                    kept_rows += 1
                assert mine.dtype == other.dtype, key
                assert torch.equal(mine.view(torch.uint8), other.view(torch.uint8)), (key, new)
    assert merged_rows > 0 and kept_rows > 0


def _expert(key: str, layer: int, new: int) -> str | None:
    """'per-expert' when `key` is expert `new` of `layer`, 'fused' for its fused stacks."""
    head = f"layers.{layer}.mlp.experts."
    if head not in key:
        return None
    rest = key.split(head, 1)[1]
    if rest.split(".")[0] == str(new):
        return "per-expert"
    return "fused" if not rest[0].isdigit() and "bias" not in rest else None


@pytest.mark.parametrize("case", ["deepseek_v3-fp8", "gpt_oss-mxfp4"])
def test_prune_data_refits_are_written_requantized(case, quantized, sample_texts, tmp_path):
    q, deq = quantized(case)
    text = next(iter(sample_texts.values()))
    args = ["--data", f"a={text}", "--max-tokens", "512", "--seq-len", "32", "--ratio", "0.25",
            "--compensate", "--no-refit-router", "--dtype", "float32"]
    output = run("prune", q, *args, "--out", tmp_path / "ours")
    assert "re-encoded" in " ".join(output.split())
    run("prune", deq, *args, "--out", tmp_path / "plain")
    theirs = _independent(case, tmp_path / "plain", tmp_path / "theirs")
    provenance = json.loads((tmp_path / "ours" / "moekit_provenance.json").read_text())
    plain = json.loads((tmp_path / "plain" / "moekit_provenance.json").read_text())
    assert [layer["kept"] for layer in provenance["layers"]] == \
        [layer["kept"] for layer in plain["layers"]]
    modified = provenance["calibration"]["modified_tensors"]
    assert modified and all(row["stored"].startswith("re-encoded as") for row in modified)
    assert "quantized like the source" in (tmp_path / "ours" / "README.md").read_text()
    src = load_file(q / "model.safetensors")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    ref = load_file(theirs / "model.safetensors")
    # (layer, new id, projection) of every refitted (down) or reconstructed (gate/up) tensor
    refitted = {(row["layer"], row["new_id"], _projection(row["tensor"])) for row in modified}
    checked = {True: 0, False: 0}
    for layer in provenance["layers"]:
        for old, new in layer["old_to_new"].items():
            for key in ours:
                where = _expert(key, layer["layer"], new)
                if where is None or "bias" in key:
                    continue
                mine = ours[key][new] if where == "fused" else ours[key]
                changed = (layer["layer"], new, _projection(key)) in refitted
                if changed:  # the independent quantization of the plain refit
                    other = ref[key][new] if where == "fused" else ref[key]
                elif where == "fused":
                    other = src[key][int(old)]
                else:
                    other = src[key.replace(f"experts.{new}.", f"experts.{old}.")]
                assert torch.equal(mine.view(torch.uint8), other.view(torch.uint8)), (key, new)
                checked[changed] += 1
    assert checked[True] > 0  # (every kept expert may be refitted: then none is unchanged)


def _projection(key: str) -> str:
    """'down_proj' of '...experts.3.down_proj.weight_scale_inv' or '...experts.down_proj_blocks'."""
    return next(p for p in ("gate_up_proj", "gate_proj", "up_proj", "down_proj") if p in key)


def _fail(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def test_merge_refuses_experts_it_cannot_reencode(quantized, tmp_path):
    import shutil

    from safetensors.torch import save_file

    q, _ = quantized("qwen3_moe-w4a16")
    merge = ["--criterion", "random", "--ratio", "0.25", "--group", "weight", "--method",
             "average"]
    output = _fail("merge", q, *merge, "--out", tmp_path / "o")
    assert "which moekit cannot re-encode after changing it" in output
    assert not (tmp_path / "o").exists()
    # FP8 with static activation scales: the merged experts' input_scale cannot be recomputed
    fp8, _ = quantized("qwen3_moe-fp8")
    static = tmp_path / "static"
    shutil.copytree(fp8, static)
    tensors = load_file(static / "model.safetensors")
    tensors.update({k.replace("weight_scale_inv", "input_scale"): torch.ones(1)
                    for k in list(tensors) if k.endswith("weight_scale_inv")})
    save_file(tensors, static / "model.safetensors", metadata={"format": "pt"})
    output = _fail("merge", static, *merge, "--out", tmp_path / "o")
    assert "is an activation parameter of the quantized" in output
    assert not (tmp_path / "o").exists()
    run("merge", static, *merge, "--bf16-experts", "--out", tmp_path / "b")  # written as bf16
    written = load_file(tmp_path / "b" / "model.safetensors")
    assert not any(".mlp.experts." in k and k.endswith("input_scale") for k in written)


def test_merge_bf16_experts_of_a_compressed_checkpoint(quantized, sample_texts, tmp_path):
    """compressed-tensors experts cannot be re-encoded, but `--bf16-experts` merges them: the
    merged layers' experts as bf16, equal to the bf16 cast of the same merge on the library's
    dequantization, named in the config's `ignore` list; moekit profiles the output."""
    q, deq = quantized("qwen3_moe-w4a16")
    plan = tmp_path / "plan.json"
    run("merge", q, "--criterion", "random", "--ratio", "0.25", "--group", "weight", "--method",
        "average", "--bf16-experts", "--plan-out", plan, "--out", tmp_path / "ours")
    run("merge", deq, "--plan", plan, "--ignore-fingerprint", "--out", tmp_path / "plain")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    experts = [k for k in plain if ".mlp.experts." in k]
    assert experts
    for key in experts:
        assert ours[key].dtype == torch.bfloat16, key
        assert torch.equal(ours[key], plain[key].to(torch.bfloat16)), key
    ignore = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"][
        "ignore"]
    assert "re:^model\\.layers\\.0\\.mlp\\.experts\\." in ignore
    text = next(iter(sample_texts.values()))
    run("profile", tmp_path / "ours", "--data", f"a={text}", "--max-tokens", "256",
        "--seq-len", "32", "--out", tmp_path / "prof")
