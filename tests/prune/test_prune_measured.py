"""Measured selection against independent computations.

- The re-routed layer output used for selection (replay) equals the output of the pruned
  checkpoint's MoE block, loaded by transformers after the real surgery, on the same inputs
  (several families: softmax+renorm, shared experts, sigmoid+bias+groups, topk_first+biases).
- Refitted down projections written by the surgery give the same block output as the in-memory
  refit (override + refit), and the refit lowers the error on tokens it never saw.
- Beam search vs brute force over all removal sets of a tiny layer.
- The routing library vs the router modules' own top-k.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from support import block_output, keep_for, measured_setup, random_tokens
from tiny_models import build_model

from moekit.calib.capture import capture_layers, moe_blocks
from moekit.calib.routing import Routing, route, selection_bias
from moekit.families.registry import resolve
from moekit.io.reader import Checkpoint
from moekit.layerfit.compensate import refit_layer, set_down_weight
from moekit.layerfit.override import PrunedLayers
from moekit.layerfit.replay import build_replay
from moekit.layerfit.search import search_drop
from moekit.ops.prune import prune_checkpoint
from moekit.ops.prune.rewrite import modified_tensors
from moekit.ops.prune.select import build_plan
from moekit.runtime.loading import load_model

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2", "gpt_oss",
            "olmoe", "glm4_moe"]


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_replay_equals_pruned_checkpoint(model_type, fixed, tmp_path):
    """`fixed`: the replay of one kept set (`build_replay(keep=...)`, 2k cached experts per
    token, merge's and `--effort fast`'s refit) answers for it as the search's replay does."""
    folder, model, layout, fingerprint = measured_setup(model_type, tmp_path)
    family = layout.family
    num = layout.moe_layers[0].num_experts
    n_drop = 2
    keep = keep_for(layout, num, n_drop)
    plan = build_plan(layout, fingerprint, keep=keep)
    prune_checkpoint(folder, plan, tmp_path / "out")
    pruned = load_model(tmp_path / "out", "cpu", "float32")
    routing = Routing.of(family, layout.config)
    after = routing.after_prune(plan.config_changes)
    caps = capture_layers(model, family, random_tokens(3), max_tokens=96)
    pruned_blocks = {b.layer: b for b in moe_blocks(pruned, family)}
    for block in moe_blocks(model, family):
        cap = caps[block.layer]
        replay = build_replay(block.experts, cap.inputs, cap.logits, selection_bias(block.block),
                              routing, after, n_drop, keep_outputs=True,
                              keep=keep[block.layer] if fixed else None)
        if fixed:
            assert replay.cand.shape[1] == 2 * routing.top_k
        predicted = cap.outputs - replay.target + replay.output(keep[block.layer])
        actual = block_output(pruned_blocks[block.layer].block, cap.inputs)
        torch.testing.assert_close(predicted, actual, rtol=1e-4, atol=1e-5)
        direct = (actual - cap.outputs + replay.target)
        err = float((replay.target - direct).pow(2).sum(-1).mean())
        assert replay.error(keep[block.layer]) == pytest.approx(err, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_refit_written_equals_refit_in_memory_and_helps_unseen_tokens(model_type, tmp_path):
    folder, model, layout, fingerprint = measured_setup(model_type, tmp_path)
    family, num, n_drop = layout.family, layout.moe_layers[0].num_experts, 2
    keep = keep_for(layout, num, n_drop)
    plan = build_plan(layout, fingerprint, keep=keep)
    routing = Routing.of(family, layout.config)
    after = routing.after_prune(plan.config_changes)
    block = moe_blocks(model, family)[-1]
    fit_cap = capture_layers(model, family, random_tokens(40, seed=1), max_tokens=1280,
                             layers=[block.layer])[block.layer]
    new_cap = capture_layers(model, family, random_tokens(10, seed=2), max_tokens=320,
                             layers=[block.layer])[block.layer]
    bias = selection_bias(block.block)
    kept = keep[block.layer]
    replay = build_replay(block.experts, fit_cap.inputs, fit_cap.logits, bias, routing, after,
                          n_drop)
    fit = refit_layer(block.layer, replay, block.experts, fit_cap.inputs, kept)
    assert fit.weights, "the refit should help on this layer"
    unseen_before = build_replay(block.experts, new_cap.inputs, new_cap.logits, bias, routing,
                                 after, n_drop)
    before = unseen_before.error(kept)
    original = {e: block.experts.down_proj[e].detach().clone() for e in fit.weights}
    for e, w in fit.weights.items():
        set_down_weight(block.experts, e, w)
    unseen_after = build_replay(block.experts, new_cap.inputs, new_cap.logits, bias, routing,
                                after, n_drop)
    unseen_after.target = unseen_before.target  # the unpruned, unrefitted layer's output
    assert unseen_after.error(kept) < before
    with PrunedLayers() as pruned:
        pruned.add(block, kept, after, family.router.logits_index)
        in_memory = block_output(block.block, new_cap.inputs)
    for e, w in original.items():
        block.experts.down_proj.data[e] = w
    layers = {block.layer: fit.weights}
    modified, rows = modified_tensors(Checkpoint(folder), layout, plan, layers,
                                      {block.layer: fit.rel_change})
    assert {r["expert"] for r in rows} == set(fit.weights)
    prune_checkpoint(folder, plan, tmp_path / "out", modified=modified)
    pruned_model = load_model(tmp_path / "out", "cpu", "float32")
    written = block_output(moe_blocks(pruned_model, family)[-1].block, new_cap.inputs)
    torch.testing.assert_close(written, in_memory, rtol=1e-4, atol=1e-5)


def test_beam_search_matches_brute_force():
    """Tiny 8-expert layers, drop 3: beam search (width 4) reaches the exhaustive optimum;
    greedy is never better than the optimum and the single errors are the 1-expert optima."""
    hits = 0
    for seed in range(4):
        model = build_model("qwen3_moe", seed=seed)
        family = resolve(model.config.to_dict()).family
        for name, tensor in model.named_parameters():
            if name.endswith("gate.weight"):
                tensor.data.mul_(8.0)
        routing = Routing.of(family, model.config.to_dict())
        block = moe_blocks(model, family)[0]
        cap = capture_layers(model, family, random_tokens(4, seed), max_tokens=128,
                             layers=[block.layer])[block.layer]
        replay = build_replay(block.experts, cap.inputs, cap.logits, None, routing, routing, 3)
        brute = min(replay.error([e for e in range(8) if e not in s])
                    for s in itertools.combinations(range(8), 3))
        beam = search_drop(replay.error, 8, 3, beam=4)
        greedy = search_drop(replay.error, 8, 3, beam=1)
        assert greedy.error >= brute - 1e-12 and beam.error <= greedy.error + 1e-12
        hits += beam.error == pytest.approx(brute, rel=1e-9)
        assert min(beam.single) == pytest.approx(min(
            replay.error([e for e in range(8) if e != j]) for j in range(8)))
    assert hits >= 3


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss",
                                        "deepseek_v2", "olmoe"])
def test_route_matches_router_module(model_type, tmp_path):
    _, model, layout, _ = measured_setup(model_type, tmp_path)
    family = layout.family
    routing = Routing.of(family, layout.config)
    for block in moe_blocks(model, family):
        x = torch.randn(64, model.config.get_text_config().hidden_size)
        with torch.no_grad():
            out = block.router(x)
        z, weights, ids = out[family.router.logits_index], out[1], out[2]
        got_ids, got_w = route(z, routing, selection_bias(block.block))
        ids_s, order = ids.sort(1)
        got_s, got_order = got_ids.sort(1)
        assert torch.equal(ids_s, got_s)
        torch.testing.assert_close(got_w.gather(1, got_order), weights.float().gather(1, order))


def test_cached_candidates_keep_exact_ties():
    """bf16 logits tie exactly; every expert tied at the (k+n)-th score must be cached, so any
    top-k among survivors finds its outputs."""
    from moekit.layerfit.replay import cached_candidates

    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, -1.0], [3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    routing = Routing("softmax", False, 2, True)
    cand = cached_candidates(logits, routing, None, n_drop=1)
    assert cand.shape[1] == 4 and set(cand[0].tolist()) == {0, 1, 2, 3}
    for dropped in range(6):
        keep = [e for e in range(6) if e != dropped]
        ids, _ = route(logits, routing, None, keep)
        assert all(int(i) in cand[t].tolist() for t in range(2) for i in ids[t])


def test_cached_candidates_keep_near_ties_the_softmax_rounds_together():
    """Logits 2.4e-7 apart (met in a real run, Qwen2-MoE layer 1): the softmax rounds them to
    one probability and top-k takes the lower id, while the raw logits rank the other first;
    both must be cached, so every top-k among survivors finds its outputs."""
    from moekit.layerfit.replay import cached_candidates

    logits = torch.tensor([[1.7246342, -0.7716938, 0.6046540, 0.6126444, 0.1958932,
                            -0.5986701, -0.5986699, -0.3973309]])
    routing = Routing("softmax", False, 2, False)
    cand = cached_candidates(logits, routing, None, n_drop=4)
    assert {5, 6} <= set(cand[0].tolist())
    for dropped in itertools.combinations(range(8), 4):
        keep = [e for e in range(8) if e not in dropped]
        ids, _ = route(logits, routing, None, keep)
        assert all(int(i) in cand[0].tolist() for i in ids[0])
