"""The beam search's incremental D(S + e) (`layerfit.incremental`) against the full evaluation.

- Routing a subset of the tokens gives those rows' full-routing results bit for bit (what lets
  the incremental error re-route only the tokens a removal touches).
- D(S + e) from the state of S equals `LayerReplay.error` and the D computed directly from the
  expert outputs, along chains of removal sets, for every local routing kind (softmax with
  renormalisation, top-k first, sigmoid with selection bias), also with bf16-rounded logits
  whose ties at the k-th score are re-routed every time.
- The beam search chooses the same sets (and the same single-expert scores) with and without
  it, on synthetic layers and on captured layers of tiny models; routings that are not local
  (softmax without renormalisation, groups) keep the full evaluation.
Values agree to float rounding, not bit for bit: a token the removal does not touch keeps its
term from the state, whose weights were computed among more experts (softmax denominators).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import build_model

from moekit.calib.capture import capture_layers, moe_blocks
from moekit.calib.routing import Routing, route, selection_bias
from moekit.families.registry import resolve
from moekit.layerfit.incremental import IncrementalError, local_routing
from moekit.layerfit.replay import build_replay
from moekit.layerfit.search import search_drop

LOCAL = {
    "softmax-renorm": Routing("softmax", False, 2, True),
    "topk-first": Routing("softmax", True, 2, False),
    "sigmoid-bias": Routing("sigmoid", False, 3, True, scaling=2.5),
}


class _Experts(torch.nn.Module):
    """f_e(x) = tanh(W_e x) (a stand-in for a transformers experts module: rows, ids, weights)."""

    def __init__(self, num: int, hidden: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.randn(num, hidden, hidden, generator=gen) / hidden ** 0.5
        self.num_experts = num

    def forward(self, x, ids, weights):  # noqa: ANN001, ANN201
        return torch.tanh(torch.einsum("nij,nj->ni", self.w[ids[:, 0]], x)) * weights


def _replay(kind: str, n_drop: int, seed: int = 0, num: int = 8, tokens: int = 400,
            bf16: bool = False, keep_outputs: bool = True):
    gen = torch.Generator().manual_seed(seed)
    routing = LOCAL[kind]
    logits = torch.randn(tokens, num, generator=gen) * 2
    if bf16:
        logits = (logits * 4).round() / 4  # coarse logits: many exact ties at the k-th score
    bias = torch.randn(num, generator=gen) * 0.1 if kind == "sigmoid-bias" else None
    x = torch.randn(tokens, 16, generator=gen)
    return build_replay(_Experts(num, 16, seed), x, logits, bias, routing, routing, n_drop,
                        keep_outputs=keep_outputs)


def _old_error(replay, keep: list[int]) -> float:
    """`LayerReplay.error` as it was before `token_errors` (whole Gram rows gathered)."""
    ids, weights = replay.routed(keep)
    slots = replay.slot.gather(1, ids)
    w = weights.double()
    cross = replay.cross.gather(1, slots)
    num, k = slots.shape
    rows_g = replay.gram.gather(1, slots.unsqueeze(-1).expand(num, k, replay.gram.shape[2]))
    pair = rows_g.gather(2, slots.unsqueeze(1).expand(num, k, k))
    sq = replay.tnorm - 2 * (w * cross).sum(1) + ((w.unsqueeze(2) * pair) * w.unsqueeze(1)).sum(
        (1, 2))
    return float(sq.clamp(min=0).mean())


def _direct(replay, keep: list[int]) -> float:
    return float((replay.target - replay.output(keep)).double().pow(2).sum(-1).mean())


@pytest.mark.parametrize("kind", list(LOCAL))
def test_routing_rows_is_routing_all_then_rows(kind):
    replay = _replay(kind, 3, bf16=True)
    rows = torch.tensor([5, 0, 17, 399, 42, 42])
    keep = [0, 2, 3, 5, 6, 7]
    ids, weights = route(replay.logits, replay.routing, replay.bias, keep)
    sub_ids, sub_w = route(replay.logits[rows], replay.routing, replay.bias, keep)
    assert torch.equal(sub_ids, ids[rows]) and torch.equal(sub_w, weights[rows])
    full = replay.token_errors(ids, weights)
    assert torch.equal(replay.token_errors(sub_ids, sub_w, rows), full[rows])
    assert replay.error(keep) == _old_error(replay, keep)  # bit for bit


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("kind", list(LOCAL))
def test_incremental_error_equals_full_along_chains(kind, bf16):
    n_drop = 4
    replay = _replay(kind, n_drop, seed=3, bf16=bf16)
    assert local_routing(replay)
    inc = IncrementalError(replay)
    for chain in [(0, 1, 2, 3), (7, 5, 3, 1), (2, 6, 4, 0)]:
        for size in range(1, n_drop + 1):
            parent, e = tuple(sorted(chain[:size - 1])), chain[size - 1]
            keep = [x for x in range(8) if x not in chain[:size]]
            got = inc.extend(parent, e)
            assert got == pytest.approx(replay.error(keep), rel=1e-6, abs=1e-12)
            assert got == pytest.approx(_direct(replay, keep), rel=1e-5, abs=1e-9)


def test_ties_are_rerouted():
    """Exact ties at the k-th score: every tied token is in the re-routed set of each state."""
    replay = _replay("softmax-renorm", 3, bf16=True)
    inc = IncrementalError(replay)
    inc.extend((), 0)
    state = inc.states[()]
    top = torch.topk(replay.logits, 3, dim=-1).values
    tied = (top[:, 1] == top[:, 2]).nonzero().flatten()
    assert tied.numel() > 0 and set(tied.tolist()) <= set(state.always.tolist())


@pytest.mark.parametrize("kind", list(LOCAL))
def test_beam_search_same_with_incremental(kind):
    for seed in range(3):
        replay = _replay(kind, 4, seed=seed, bf16=seed == 2, keep_outputs=False)
        plain = search_drop(replay.error, 8, 4, beam=3, protected=frozenset({seed}))
        fast = search_drop(replay.error, 8, 4, beam=3, protected=frozenset({seed}),
                           extend=IncrementalError(replay).extend)
        assert fast.dropped == plain.dropped and fast.single == plain.single
        assert fast.error == pytest.approx(plain.error, rel=1e-6)
        brute = min(replay.error([e for e in range(8) if e not in s])
                    for s in itertools.combinations([e for e in range(8) if e != seed], 4))
        assert fast.error >= brute - 1e-12


@pytest.mark.parametrize("model_type,overrides,local", [
    ("mixtral", {}, True), ("gpt_oss", {}, True), ("qwen3_moe", {}, True),
    ("qwen2_moe", {}, True), ("qwen2_moe", {"norm_topk_prob": False}, False),
    ("deepseek_v3", {}, False)])
def test_tiny_models_same_choice(model_type, overrides, local):
    model = build_model(model_type, seed=1, **overrides)
    family = resolve(model.config.to_dict()).family
    for name, tensor in model.named_parameters():
        if name.endswith(("gate.weight", "router.weight")) and tensor.dim() == 2:
            tensor.data.mul_(8.0)
    routing = Routing.of(family, model.config.get_text_config().to_dict())
    gen = torch.Generator().manual_seed(5)
    tokens = [torch.randint(3, 256, (1, 32), generator=gen) for _ in range(6)]
    for block in moe_blocks(model, family):
        cap = capture_layers(model, family, tokens, max_tokens=192,
                             layers=[block.layer])[block.layer]
        num = int(block.experts.num_experts)
        n_drop = num // 4
        replay = build_replay(block.experts, cap.inputs, cap.logits,
                              selection_bias(block.block), routing, routing, n_drop)
        assert local_routing(replay) is local
        if not local:
            continue
        plain = search_drop(replay.error, num, n_drop, beam=4)
        fast = search_drop(replay.error, num, n_drop, beam=4,
                           extend=IncrementalError(replay).extend)
        assert (fast.dropped, fast.single) == (plain.dropped, plain.single)
        assert fast.error == pytest.approx(plain.error, rel=1e-6, abs=1e-12)
