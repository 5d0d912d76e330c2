"""The whole-expert reconstruction (`reconstruct`): on a tiny experts module whose target comes
from known, different weights of the kept experts, the fit recovers most of the difference on
tokens it never saw; when the start is already exact it changes nothing; the module itself is
left as it was. Canonical gate/up read back from the module match what the checkpoint holds."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model

from moekit.calib.capture import moe_blocks
from moekit.families.registry import resolve
from moekit.layerfit.reconstruct import (
    GateUp,
    apply_gate_up,
    can_reconstruct,
    canonical_gate_up,
    reconstruct_layer,
    restore_rebuild,
)


def _experts(model_type: str):
    model = build_model(model_type, seed=1).float().eval()
    family = resolve(model.config.to_dict()).family
    return moe_blocks(model, family)[0].experts, family


def _routing(num: int, kept: list[int], k: int, tokens: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.tensor(kept)[torch.randperm(len(kept), generator=gen)[:k]]
                       for _ in range(tokens)])
    gates = torch.rand(tokens, k, generator=gen).softmax(-1)
    return ids, gates


def _perturbed_target(experts, kept, x, ids, gates, seed: int):
    """The output of the kept experts with gate/up and down perturbed (the module is restored):
    a target whose weights the fit can recover."""
    before = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in before:
            param = getattr(experts, name)
            param.data[kept] += 0.3 * param.data[kept].std() * torch.randn(
                param.data[kept].shape, generator=gen)
        target = experts(x, ids, gates).clone()
        for name, value in before.items():
            getattr(experts, name).data.copy_(value)
    return target


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_reconstruction_recovers_known_weights_on_unseen_tokens(model_type):
    experts, _ = _experts(model_type)
    assert can_reconstruct(experts)
    num, kept = int(experts.num_experts), [0, 2, 3, 5]
    hidden = experts.gate_up_proj.shape[1 if getattr(experts, "is_transposed", False) else 2]
    x = torch.randn(1200, hidden, generator=torch.Generator().manual_seed(1))
    ids, gates = _routing(num, kept, 2, x.shape[0])
    before = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    target = _perturbed_target(experts, kept, x, ids, gates, 2)
    with torch.no_grad():
        start = float((experts(x, ids, gates) - target).pow(2).sum(-1).mean())
    rebuild = reconstruct_layer(0, experts, x, ids, gates, target, kept, steps=200)
    for name, value in before.items():  # the module is not modified
        assert torch.equal(getattr(experts, name), value)
    assert rebuild.changed and set(rebuild.rows["gate_up_proj"]) == set(kept)
    with torch.no_grad():
        held_start = float((experts(x[900:], ids[900:], gates[900:]) - target[900:])
                           .pow(2).sum()) / 300
    assert rebuild.held_before == pytest.approx(held_start, rel=1e-4)
    assert rebuild.held_before > 0.5 * start
    assert rebuild.held_after < 0.5 * rebuild.held_before, (rebuild.held_before,
                                                           rebuild.held_after)
    saved = {}
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            saved[name] = {}
            for e, row in rebuild.rows[name].items():
                saved[name][e] = getattr(experts, name).data[e].clone()
                getattr(experts, name).data[e] = row
        held = float((experts(x[900:], ids[900:], gates[900:]) - target[900:])
                     .pow(2).sum()) / 300
    assert held == pytest.approx(rebuild.held_after, rel=1e-4)
    restore_rebuild(experts, saved)


def test_an_exact_start_is_left_unchanged():
    experts, _ = _experts("mixtral")
    kept = [1, 4, 6]
    x = torch.randn(400, experts.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(4))
    ids, gates = _routing(int(experts.num_experts), kept, 2, 400)
    with torch.no_grad():
        target = experts(x, ids, gates).clone()
    rebuild = reconstruct_layer(0, experts, x, ids, gates, target, kept, steps=30)
    assert not rebuild.changed and rebuild.held_after == rebuild.held_before
    assert not reconstruct_layer(0, experts, x, ids, gates, target + 1, kept, steps=0).changed


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3"])
def test_canonical_gate_up_round_trips_through_the_module(model_type):
    """canonical -> module (`apply_gate_up`) -> canonical is the identity and restoring undoes
    it (that the canonical pair is the checkpoint's gate and up is checked end to end by
    `test_prune_calibrated`: written checkpoint == in-memory plan)."""
    experts, family = _experts(model_type)

    inter = bool(family.experts.fused and family.experts.interleaved)  # as the layout says
    rows = {e: experts.gate_up_proj.data[e].clone() for e in range(int(experts.num_experts))}
    pairs = canonical_gate_up(experts, rows, inter)
    gen = torch.Generator().manual_seed(5)
    fixed = {e: (g + 0.1 * torch.randn(g.shape, generator=gen),
                 u - 0.1 * torch.randn(u.shape, generator=gen))
             for e, (g, u) in pairs.items() if e in (0, 3)}
    saved = apply_gate_up(experts, {e: GateUp(lambda p=p: p) for e, p in fixed.items()}, inter)
    back = canonical_gate_up(experts, {e: experts.gate_up_proj.data[e] for e in fixed}, inter)
    for e, (g, u) in fixed.items():
        torch.testing.assert_close(back[e][0], g)
        torch.testing.assert_close(back[e][1], u)
    restore_rebuild(experts, saved)
    torch.testing.assert_close(experts.gate_up_proj.data[0], rows[0])


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_kept_only_fit_equals_the_fit_through_all_experts(model_type, monkeypatch):
    """The fit runs the kept experts alone (their rows, ids renumbered, the module told E');
    it takes the same steps to the same weights as the fit through all E experts' weights
    (the path before; the module's `num_experts` is restored)."""
    from moekit.layerfit import reconstruct

    experts, _ = _experts(model_type)
    num, kept = int(experts.num_experts), [1, 2, 4, 7]
    hidden = experts.gate_up_proj.shape[1 if getattr(experts, "is_transposed", False) else 2]
    x = torch.randn(600, hidden, generator=torch.Generator().manual_seed(3))
    ids, gates = _routing(num, kept, 2, x.shape[0])
    target = _perturbed_target(experts, kept, x, ids, gates, 4)
    assert reconstruct._kept_only(
        experts, {n: p.detach() for n, p in experts.named_parameters(recurse=False)}, kept, x,
        ids, gates) is not None
    mine = reconstruct_layer(0, experts, x, ids, gates, target, kept, steps=60)
    assert int(experts.num_experts) == num
    monkeypatch.setattr(reconstruct, "_kept_only", lambda *args: None)
    theirs = reconstruct_layer(0, experts, x, ids, gates, target, kept, steps=60)
    assert mine.changed and (mine.steps, mine.best_step) == (theirs.steps, theirs.best_step)
    assert mine.held_after == pytest.approx(theirs.held_after, rel=1e-4)
    for name, rows in mine.rows.items():
        for e, row in rows.items():
            torch.testing.assert_close(row, theirs.rows[name][e], rtol=1e-4, atol=1e-6)
