"""The reconstruction's budget in forward passes (`layerfit.compute`): the multiply-adds of a
forward counted from parameter shapes agree with torch's own count of the matrix products run,
and the step cap is the largest count within the budget."""

from __future__ import annotations

import pytest
from tiny_models import build_model

from moekit.layerfit.compute import expert_params, forward_macs, reconstruct_step_cap
from moekit.layerfit.reconstruct import BATCH, CHECK_EVERY


def _blocks(model, model_type):
    from moekit.calib.capture import moe_blocks
    from moekit.families.registry import resolve

    return moe_blocks(model, resolve(model.config.to_dict()).family)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "olmoe"])
def test_forward_macs_match_torch_flop_count(model_type):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # eager attention and experts: torch's counter sees every matrix product as a plain mm/bmm
    model = build_model(model_type, attn_implementation="eager",
                        experts_implementation="eager").eval()
    blocks = _blocks(model, model_type)
    k = int(model.config.num_experts_per_tok)
    tokens = 64
    ids = torch.randint(3, model.config.vocab_size, (1, tokens))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    measured = counter.get_total_flops() / 2 / tokens  # multiply-adds per position
    # torch counts the full (unmasked) score matrix: a causal window of 2 x `tokens` on average
    found = forward_macs(model, blocks, k, model.config.to_dict(), 2 * tokens)
    assert found == pytest.approx(measured, rel=0.03)
    # what the budget is counted in: the routed experts a token does not use are not counted
    dense = forward_macs(model, blocks, model.config.num_local_experts
                         if hasattr(model.config, "num_local_experts")
                         else model.config.num_experts, model.config.to_dict(), 2 * tokens)
    assert dense > found * 1.2


def test_step_cap_is_the_largest_count_within_the_budget():
    model = build_model("qwen3_moe").eval()
    blocks = _blocks(model, "qwen3_moe")
    per_position = forward_macs(model, blocks, 2, model.config.to_dict(), 128)
    positions = 65536  # a step of BATCH positions, checks on a quarter of them

    def cost(steps: int) -> float:
        held = positions / 4
        return sum(2 * expert_params(b) * (3 * BATCH * steps + held * steps / CHECK_EVERY)
                   for b in blocks)

    cap = reconstruct_step_cap(20.0, positions, per_position, blocks, 2, 10**6)
    assert CHECK_EVERY < cap < 10**6
    assert cost(cap) <= 20.0 * positions * per_position < cost(cap + 1)
    twice = reconstruct_step_cap(40.0, positions, per_position, blocks, 2, 10**6)
    assert abs(twice - 2 * cap) <= 2  # linear in the budget
    assert reconstruct_step_cap(20.0, positions, per_position, blocks, 2, 100) == 100  # the cap
    # never below one held-out check, whatever the budget
    assert reconstruct_step_cap(1e-6, positions, per_position, blocks, 2, 10**6) == CHECK_EVERY


def test_estimate_scales_a_reconstruction_step_to_the_run_positions():
    """The probe times steps of BATCH positions; a run with fewer fitted positions takes
    smaller steps (a real-width run of 1280 positions was estimated 3x too long before)."""
    from moekit.layerfit.estimate import Probe, RunShape, predict

    found = Probe(forward=1e-4, capture=1e-5, select=1e-5, step=2.0, seconds=1.0)

    def rebuild(positions: int) -> float:
        shape = RunShape(positions, 0, positions // 4, 1, 1, 1, 10, 2, 10**6)
        return predict(found, shape)["reconstruction"]

    checks = 2 * 2.0 * 0.25 / (3 * BATCH)  # one held-out check per layer, per position
    assert rebuild(1280) == pytest.approx(2 * 10 * 2.0 * 960 / BATCH + checks * 1280)
    assert rebuild(65536) == pytest.approx(2 * 10 * 2.0 + checks * 65536)
