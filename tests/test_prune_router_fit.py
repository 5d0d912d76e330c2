"""Router recalibration (`ops.prune.router_fit`) against independent computations.

- On tokens it never saw, the refitted router lowers the error of the pruned MoE block against
  the unpruned block, both computed by the transformers modules themselves (the pruning applied
  through `override.PrunedLayers`, the new rows written into the router).
- The checkpoint written by the surgery with the refitted router rows gives the same block
  output as that in-memory model.
- The error the refit reports for its held-out tokens is the block's actual error there.
- A router whose logits are not x W^T + b is left alone with a reason.
"""

from __future__ import annotations

import pytest
import torch
from test_prune_measured import _block_out, _keep_for, _setup, _tokens

from moekit.calib.capture import capture_layers, moe_blocks
from moekit.calib.routing import Routing, selection_bias
from moekit.io.reader import Checkpoint
from moekit.ops.prune import prune_checkpoint
from moekit.ops.prune.compensate import HELD_OUT
from moekit.ops.prune.override import PrunedLayers
from moekit.ops.prune.replay import build_replay
from moekit.ops.prune.rewrite import modified_tensors
from moekit.ops.prune.router_fit import (
    apply_router,
    not_refittable,
    refit_router,
    restore_router,
)
from moekit.ops.prune.select import build_plan
from moekit.runtime.loading import load_model


def _pruned_out(block, kept, routing, logits_index, x):
    with PrunedLayers() as pruned:
        pruned.add(block, kept, routing, logits_index)
        return _block_out(block.block, x)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3"])
def test_router_refit_helps_unseen_tokens_and_is_written(model_type, tmp_path):
    folder, model, layout, fingerprint = _setup(model_type, tmp_path)
    family, num = layout.family, layout.moe_layers[0].num_experts
    n_drop = num // 2
    keep = _keep_for(layout, num, n_drop)
    plan = build_plan(layout, fingerprint, keep=keep)
    routing = Routing.of(family, layout.config)
    after = routing.after_prune(plan.config_changes)
    index = family.router.logits_index
    block = moe_blocks(model, family)[-1]
    kept = keep[block.layer]
    fit_cap = capture_layers(model, family, _tokens(48, seed=1), max_tokens=1536,
                             layers=[block.layer])[block.layer]
    new_cap = capture_layers(model, family, _tokens(12, seed=2), max_tokens=384,
                             layers=[block.layer])[block.layer]
    replay = build_replay(block.experts, fit_cap.inputs, fit_cap.logits,
                          selection_bias(block.block), routing, after, n_drop)
    fit = refit_router(block.layer, replay, block.experts, block.router, fit_cap.inputs, kept,
                       replay.target)
    assert fit.changed and fit.held_after < fit.held_before and not fit.note

    # the held-out error the refit reports is the pruned block's actual error on those tokens
    cut = int(fit_cap.num_tokens * (1 - HELD_OUT))
    held_x, held_full = fit_cap.inputs[cut:], fit_cap.outputs[cut:]
    saved = apply_router(block.router, fit)
    held_after = _pruned_out(block, kept, after, index, held_x)
    restore_router(block.router, saved)
    actual = float((held_full - held_after).pow(2).sum(-1).mean())
    assert fit.held_after == pytest.approx(actual, rel=1e-3)

    full = _block_out(block.block, new_cap.inputs)  # the unpruned block, unseen tokens
    before = _pruned_out(block, kept, after, index, new_cap.inputs)
    saved = apply_router(block.router, fit)
    in_memory = _pruned_out(block, kept, after, index, new_cap.inputs)
    restore_router(block.router, saved)
    err = [float((full - y).pow(2).sum(-1).mean()) for y in (before, in_memory)]
    assert err[1] < err[0]

    modified, rows = modified_tensors(Checkpoint(folder), layout, plan, {}, {},
                                      {block.layer: fit})
    expected_keys = 2 if family.router.bias else 1
    assert len(rows) == expected_keys and all(r["rel_change"] > 0 for r in rows)
    prune_checkpoint(folder, plan, tmp_path / "out", modified=modified)
    pruned_model = load_model(tmp_path / "out", "cpu", "float32")
    written = _block_out(moe_blocks(pruned_model, family)[-1].block, new_cap.inputs)
    torch.testing.assert_close(written, in_memory, rtol=1e-4, atol=1e-5)


def test_router_with_other_logits_is_left_alone(tmp_path):
    _, model, layout, _ = _setup("mixtral", tmp_path)
    family = layout.family
    block = moe_blocks(model, family)[0]
    cap = capture_layers(model, family, _tokens(4), max_tokens=128, layers=[block.layer])
    cap = cap[block.layer]
    assert not_refittable(block.router, cap.inputs, cap.logits) == ""
    assert "not x W^T + b" in not_refittable(block.router, cap.inputs, 3 * cap.logits + 1)
    routing = Routing.of(family, layout.config)
    replay = build_replay(block.experts, cap.inputs, 3 * cap.logits + 1, None, routing,
                          routing, 2)
    fit = refit_router(block.layer, replay, block.experts, block.router, cap.inputs,
                       list(range(2, 8)), replay.target)
    assert not fit.changed and fit.weight is None and fit.note

    class NoWeight(torch.nn.Module):
        def forward(self, x):
            return x

    assert "no [E, H] weight" in not_refittable(NoWeight(), cap.inputs, cap.logits)
