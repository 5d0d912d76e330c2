"""Absorbing dropped experts' neurons into kept ones (`absorb_experiment.py`, an experiment kept
for its benchmark), on one tiny layer. Not part of the suite: `pytest experiments/`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from absorb_experiment import _slots, absorb_layer, sources  # noqa: E402
from tiny_models import build_model  # noqa: E402

from moekit.calib.capture import moe_blocks  # noqa: E402
from moekit.calib.routing import Routing, selection_bias  # noqa: E402
from moekit.families.registry import resolve  # noqa: E402
from moekit.layerfit.compensate import refit_layer  # noqa: E402
from moekit.layerfit.replay import build_replay  # noqa: E402

DROPPED = [0, 1]


def _layer(dead: bool):
    """(replay, experts, inputs, keep) of a tiny Mixtral layer on random inputs; with `dead`,
    the upper half of every kept expert's neurons never fires (zero gate rows: free slots) and
    the dropped experts' outputs are large."""
    model = build_model("mixtral", seed=3).requires_grad_(False)
    family = resolve(model.config.to_dict()).family
    block = moe_blocks(model, family)[0]
    experts = block.experts
    width = experts.gate_up_proj.shape[1] // 2
    keep = [e for e in range(experts.num_experts) if e not in DROPPED]
    if dead:
        for e in keep:
            experts.gate_up_proj[e, width // 2:width] = 0
        for d in DROPPED:
            experts.down_proj[d] *= 10  # the dropped experts matter most
    block.router.weight.mul_(8.0)  # sharper routing: tokens strongly prefer experts
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(2048, model.config.hidden_size, generator=gen)
    logits = torch.nn.functional.linear(inputs, block.router.weight)
    routing = Routing.of(family, model.config.to_dict())
    replay = build_replay(experts, inputs, logits, selection_bias(block.block), routing,
                          routing, len(DROPPED))
    return replay, experts, inputs, keep


def test_without_sources_absorb_is_the_refit():
    replay, experts, inputs, keep = _layer(dead=False)
    fit = refit_layer(0, replay, experts, inputs, keep)
    got = absorb_layer(replay, experts, inputs, keep, count=0)
    assert fit.weights and got.imported == 0
    assert got.held == pytest.approx(fit.held_after, rel=1e-5)


@pytest.mark.parametrize("select", ["energy", "obs"])
def test_free_slots_take_dropped_neurons_and_lower_the_held_out_error(select):
    replay, experts, inputs, keep = _layer(dead=True)
    fit = refit_layer(0, replay, experts, inputs, keep)
    found = sources(replay, keep, replay.routed(keep)[0])
    assert all(set(d) <= set(DROPPED) for d in found.values())
    got = absorb_layer(replay, experts, inputs, keep, select=select)
    assert got.imported > 0
    assert got.held is not None and got.held < 0.92 * fit.held_after  # 0.87 here
    width = experts.gate_up_proj.shape[1] // 2
    for e, chosen in got.chosen.items():
        own = chosen[:, 0] == e
        assert chosen.shape == (width, 2)
        assert torch.equal(chosen[own, 1], torch.arange(width)[own])  # own neurons keep slots


def test_slots_keep_own_neurons_in_place():
    got = _slots(torch.tensor([9, 0, 3, 7]), 4)
    assert got.tolist() == [0, 7, 9, 3]
