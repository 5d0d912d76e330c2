"""Surgery details without loading models: MXFP4 fused tensors, byte-range slicing, the
accounting check, config patching."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from moekit.errors import CheckpointError
from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.ops.prune.select import build_plan
from moekit.ops.prune.surgery import plan_tensors, prune_checkpoint
from moekit.surgery.plan import LayerPlan, PrunePlan
from moekit.surgery.tensors import check_accounted, patch_config

E = 8


def _mxfp4_checkpoint(tiny_checkpoint, tmp_path):
    """gpt-oss tiny config with MXFP4-style experts: U8 `_blocks` [E, 2I, 2, 16] and `_scales`
    [E, 2I, 2] (random bytes), bf16 biases, router weight and bias."""
    source = tiny_checkpoint("gpt_oss")
    folder = tmp_path / "mxfp4"
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(256, 64, generator=g)}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        tensors |= {
            p + "router.weight": torch.randn(E, 64, generator=g),
            p + "router.bias": torch.randn(E, generator=g),
            p + "experts.gate_up_proj_blocks": torch.randint(0, 255, (E, 64, 2, 16),
                                                             dtype=torch.uint8, generator=g),
            p + "experts.gate_up_proj_scales": torch.randint(0, 255, (E, 64, 2),
                                                             dtype=torch.uint8, generator=g),
            p + "experts.gate_up_proj_bias": torch.randn(E, 64, generator=g).bfloat16(),
            p + "experts.down_proj_blocks": torch.randint(0, 255, (E, 64, 1, 16),
                                                          dtype=torch.uint8, generator=g),
            p + "experts.down_proj_scales": torch.randint(0, 255, (E, 64, 1),
                                                          dtype=torch.uint8, generator=g),
            p + "experts.down_proj_bias": torch.randn(E, 64, generator=g).bfloat16(),
        }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", "x": "y"})
    return folder


def test_mxfp4_fused_tensors_are_sliced_on_the_expert_axis(tiny_checkpoint, tmp_path):
    folder = _mxfp4_checkpoint(tiny_checkpoint, tmp_path)
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    assert len(layout.moe_layers[0].fused_keys) == 6
    drop = {0: [1, 6], 1: [0, 7]}
    plan = build_plan(layout, model_fingerprint(checkpoint, layout), drop=drop)
    out = tmp_path / "out"
    result = prune_checkpoint(folder, plan, out)
    assert result.actions == {"copied": 1, "sliced": 16}
    pruned = Checkpoint(out)
    assert pruned.shards[0].metadata == {"format": "pt", "x": "y"}
    for layer, dropped in drop.items():
        kept = [j for j in range(E) if j not in dropped]
        for key in checkpoint.tensors:
            if key.startswith(f"model.layers.{layer}.mlp."):
                assert torch.equal(pruned.read(key), checkpoint.read(key)[kept]), key
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 6


def test_accounting_and_slicing_guards(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint("mixtral"))
    layout = describe(checkpoint)
    plan = build_plan(layout, "x", criterion="random", ratio=0.5)
    tensors, actions = plan_tensors(checkpoint, layout, plan)
    assert set(actions) == set(checkpoint.tensors)
    dropped = [k for k, a in actions.items() if a == "dropped"]
    assert len(dropped) == 2 * 4 * 3  # layers x dropped experts x (w1, w2, w3)
    outputs = {t.name: t for t in tensors}
    del actions[dropped[0]]
    with pytest.raises(CheckpointError, match="unaccounted"):
        check_accounted(checkpoint, actions, outputs)


def test_config_patch_keeps_types_and_reports_per_expert_values(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint("qwen3_moe"))
    layout = describe(checkpoint)
    plan = PrunePlan("explicit", 0.25, "qwen3_moe", 2, "x", [
        LayerPlan(i, E, [0, 1, 2, 3, 4, 5], [6, 7]) for i in (0, 1)])
    config = dict(checkpoint.config, expert_bias_list=[0.0] * E, num_experts_total=E)
    patched, keys, warnings = patch_config(config, layout, plan)
    assert [patched[k] for k in keys] == [6] * len(keys) and keys
    assert config[keys[0]] == E  # the source dict is untouched
    assert any("expert_bias_list" in w for w in warnings)
    assert any("num_experts_total" in w for w in warnings)
    assert patched["num_experts_per_tok"] == 2


def test_take_rows_is_a_byte_range_view(tiny_checkpoint):
    from moekit.io.writer import OutTensor
    from moekit.surgery.tensors import take_rows

    checkpoint = Checkpoint(tiny_checkpoint("deepseek_v3"))
    info = checkpoint.tensors["model.layers.1.mlp.gate.weight"]  # [8, 64] float32
    out = take_rows(info, [0, 1, 2, 5, 7])
    assert out.shape == (5, 64) and len(out.pieces) == 3  # 0-2 merged, 5, 7
    assert [p.nbytes for p in out.pieces] == [3 * 256, 256, 256]
    with pytest.raises(CheckpointError, match="only leading-axis"):
        take_rows(info, [0, 1], axis=1)
    with pytest.raises(CheckpointError, match="outside"):
        take_rows(info, [8])
    with pytest.raises(ValueError, match="pieces hold"):
        OutTensor.gather("x", "F32", (2, 64), out.pieces[:1])
