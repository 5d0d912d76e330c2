"""The down refit from streamed sums (`refit_stats`, `refit_stream`, `prune --refit-tokens`)
against the sample-based refit (`compensate.refit_layer`) and direct computations."""

from __future__ import annotations

import pytest
import torch
from support import doc_corpus, keep_for, measured_setup, random_tokens, saved_checkpoint

from moekit.calib.capture import capture_layers, moe_blocks
from moekit.calib.routing import Routing, selection_bias
from moekit.calib.spec import DataSpec
from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.layerfit.compensate import (
    HELD_OUT,
    _error,
    _pair_outputs,
    down_bias,
    down_weight,
    refit_layer,
)
from moekit.layerfit.measured import load_calibration
from moekit.layerfit.refit_stats import (
    RefitStats,
    allowed_pairs,
    solve_sweep,
    stats_error,
)
from moekit.layerfit.refit_stream import chunk_terms, fit_from_chunks, window_groups
from moekit.layerfit.replay import build_replay
from moekit.ops.prune.calibrated import DataOptions, choose_with_data
from moekit.runtime.options import RunOptions


def _layer(model_type: str, tmp_path, tokens: int = 1280):
    """(block, replay over `tokens` positions, kept ids, capture) of the last MoE layer."""
    folder, model, layout, fingerprint = measured_setup(model_type, tmp_path)
    family, num, n_drop = layout.family, layout.moe_layers[0].num_experts, 2
    routing = Routing.of(family, layout.config)
    keep = keep_for(layout, num, n_drop)
    from moekit.ops.prune.select import build_plan

    plan = build_plan(layout, fingerprint, keep=keep)
    block = moe_blocks(model, family)[-1]
    cap = capture_layers(model, family, random_tokens(tokens // 32, seed=1), max_tokens=tokens,
                         layers=[block.layer])[block.layer]
    replay = build_replay(block.experts, cap.inputs, cap.logits, selection_bias(block.block),
                          routing, routing.after_prune(plan.config_changes), n_drop)
    return block, replay, keep[block.layer], cap


def _chunks(cap, shift, bounds):
    return [(cap.inputs[a:b], cap.logits[a:b], shift[a:b]) for a, b in bounds]


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_refit_from_streamed_sums_equals_sample_refit(model_type, tmp_path):
    """Same tokens, streamed in uneven chunks (one across the fit/held-out cut): the same
    alpha, weights and held-out errors as the Gauss-Seidel sweep on the whole sample."""
    block, replay, kept, cap = _layer(model_type, tmp_path)
    num = cap.num_tokens
    gen = torch.Generator().manual_seed(3)
    shift = 0.1 * replay.target.std() * torch.randn(cap.inputs.shape, generator=gen)  # drift
    sample = refit_layer(block.layer, replay, block.experts, cap.inputs, kept, shift=shift)
    assert sample.weights, "the refit should help on this layer"
    cut = int(num * (1 - HELD_OUT))
    bounds = [(0, 300), (300, cut + 17), (cut + 17, num)]
    streamed = fit_from_chunks(block.layer, block.experts, replay, kept,
                               _chunks(cap, shift, bounds), num)
    assert streamed.alpha == sample.alpha
    assert streamed.held_before == pytest.approx(sample.held_before, rel=1e-5)
    assert streamed.held_after == pytest.approx(sample.held_after, rel=1e-4)
    assert set(streamed.weights) == set(sample.weights)
    for e, w in sample.weights.items():
        torch.testing.assert_close(streamed.weights[e], w, rtol=1e-3, atol=1e-5)


def _terms(model_type, tmp_path):
    block, replay, kept, cap = _layer(model_type, tmp_path, tokens=640)
    hidden = int(replay.target.shape[1])
    base = {e: down_weight(block.experts, e) for e in kept}
    bias = {e: down_bias(block.experts, e, hidden) for e in kept}
    ids, gates, hid, resid = chunk_terms(block.experts, replay, kept, cap.inputs, cap.logits,
                                         None, base, bias)
    return block, replay, kept, base, bias, (ids, gates, hid, resid)


def test_held_out_error_from_sums_equals_direct_error(tmp_path):
    """tr-form error of arbitrary new weights = mean ||target - y'||^2 computed token by
    token (`compensate._error`), with the target recovered as R + y'_0."""
    block, replay, kept, base, bias, (ids, gates, hid, resid) = _terms("mixtral", tmp_path)
    held = RefitStats(kept)
    held.add(ids, gates, hid, resid)
    gen = torch.Generator().manual_seed(5)
    delta = {e: 0.1 * torch.randn(base[e].shape, generator=gen, dtype=torch.float64)
             for e in kept[::2]}
    hidden, num = int(replay.target.shape[1]), replay.num_experts
    full_base = [down_weight(block.experts, e) for e in range(num)]
    full_bias = [down_bias(block.experts, e, hidden) for e in range(num)]
    target = resid + (_pair_outputs(ids, hid, {}, full_base, full_bias)
                      * gates.unsqueeze(-1)).sum(1)
    weights = {e: (base[e].double() + d).float() for e, d in delta.items()}
    direct = _error(target, ids, gates, hid, weights, full_base, full_bias)
    assert stats_error(held, delta) == pytest.approx(direct, rel=1e-4)
    assert stats_error(held, {}) == pytest.approx(float(resid.pow(2).sum(-1).mean()), rel=1e-6)


def test_sweep_without_couplings_is_a_jacobi_step(tmp_path):
    """With no co-routed pair stored (the memory fallback), each expert's change is the ridge
    solution for the residual at everybody else's original weights, computed directly."""
    block, replay, kept, base, bias, (ids, gates, hid, resid) = _terms("mixtral", tmp_path)
    stats = RefitStats(kept, allowed=set())
    stats.add(ids, gates, hid, resid)
    assert not stats.pairs
    delta = solve_sweep(stats, 1.0)
    for e in kept:
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        x = (gates[tok, slot].unsqueeze(1) * hid[tok, slot]).double()  # a h
        gram = x.T @ x
        lam = float(gram.diagonal().sum()) / gram.shape[0]
        want = torch.linalg.lstsq(torch.cat([x, lam ** 0.5 * torch.eye(x.shape[1],
                                                                          dtype=x.dtype)]),
                                  torch.cat([resid[tok].double(),
                                             torch.zeros(x.shape[1], resid.shape[1],
                                                         dtype=x.dtype)])).solution.T
        torch.testing.assert_close(delta[e], want, rtol=1e-6, atol=1e-8)


def test_allowed_pairs_keeps_the_most_frequent_under_the_budget():
    ids = torch.tensor([[0, 1]] * 5 + [[1, 2]] * 3 + [[0, 2]] * 1 + [[2, 3]] * 2)
    inner = 4
    one_pair = 2 * 8 * inner * inner
    assert allowed_pairs(ids, [0, 1, 2, 3], inner, budget=6 * one_pair) is None  # all 6 fit
    assert allowed_pairs(ids, [0, 1, 2, 3], inner, budget=2 * one_pair) == {(0, 1), (1, 2)}


def test_window_groups_cover_every_window_in_order():
    groups = window_groups([64, 64, 32, 64, 64, 64], 100)
    assert groups == [[0, 1], [2, 3, 4], [5]]


def test_load_calibration_reads_refit_windows_after_the_selection_and_scoring(tmp_path):
    """Selection and held-out windows unchanged; the extra windows follow them in the source."""
    from tiny_models import tokenizer

    from moekit.calib.data import load_domains

    folder = saved_checkpoint("mixtral", tmp_path / "src")
    source = doc_corpus(tmp_path)
    layout = describe(Checkpoint(folder))
    args = dict(max_tokens=256, run=RunOptions(device="cpu", dtype="float32"))
    plain = load_calibration(folder, layout, DataSpec((source,), seq_len=32), **args)
    more = load_calibration(folder, layout, DataSpec((source,), seq_len=32), refit_tokens=1024,
                            **args)
    assert not plain.extra and not plain.streams_refit
    assert [w.tolist() for w in more.fit] == [w.tolist() for w in plain.fit]
    assert [w.tolist() for w in more.held] == [w.tolist() for w in plain.held]
    assert more.refit_tokens == 1024 and more.streams_refit
    every = load_domains([source], tokenizer(), seq_len=32, max_tokens=4096)[0].windows
    first = -(-max(64, int(256 / 0.8) + 32) // 32)  # the windows read for selection + scoring
    assert first > len(plain.fit) + len(plain.held) - 1
    assert [w[0].tolist() for w in more.extra] == [w.tolist() for w in
                                                    every[first:first + len(more.extra)]]


def test_prune_with_refit_tokens_refits_on_the_streamed_tokens(tmp_path):
    """End to end (fails without the streamed refit): the first MoE layer's refit of
    `prune --data --refit-tokens` equals `fit_from_chunks` on a capture of all its positions
    (selection + extra windows) by the unmodified model (no earlier layer is pruned there, so
    the pruned lane's inputs are the model's and the drift is zero), and differs from the refit
    on the selection's positions alone."""
    folder, model, layout, fingerprint = measured_setup("mixtral", tmp_path)
    source = doc_corpus(tmp_path)
    options = DataOptions(DataSpec((source,), seq_len=64), max_tokens=512, beam=2,
                          compensate=True, protect_super=False,
                          run=RunOptions(device="cpu", dtype="float32"),
                          refit_tokens=2048, reconstruct_steps=0)
    choice = choose_with_data(folder, layout, fingerprint, criterion="measured", ratio=0.5,
                              protect={}, min_experts=None, options=options,
                              log=lambda _: None)
    cal = load_calibration(folder, layout, DataSpec((source,), seq_len=64), max_tokens=512,
                           run=RunOptions(device="cpu", dtype="float32"), refit_tokens=2048)
    family, layer = layout.family, layout.moe_layers[0].index
    plan_layer = next(p for p in choice.chosen.plan.layers if p.layer == layer)
    block = next(b for b in moe_blocks(model, family) if b.layer == layer)
    routing = Routing.of(family, layout.config)
    n_drop = layout.moe_layers[0].num_experts - len(plan_layer.kept)
    cap = capture_layers(model, family, cal.fit + cal.extra, max_tokens=cal.refit_tokens,
                         layers=[layer])[layer]
    sel = slice(0, cal.max_tokens)
    replay = build_replay(block.experts, cap.inputs[sel], cap.logits[sel],
                          selection_bias(block.block), routing, routing.after_prune({}),
                          n_drop)
    want = fit_from_chunks(layer, block.experts, replay, plan_layer.kept,
                           [(cap.inputs, cap.logits, None)], cal.refit_tokens)
    small = refit_layer(layer, replay, block.experts, cap.inputs[sel], plan_layer.kept)
    got = next(c for c in choice.candidates if c.name == "measured+compensate").weights[layer]
    assert want.weights and set(got) == set(want.weights)
    for e, w in want.weights.items():
        torch.testing.assert_close(torch.as_tensor(got[e]).float(), w, rtol=1e-3, atol=1e-5)
    assert any(not torch.allclose(small.weights.get(e, w), w, rtol=1e-2)
               for e, w in want.weights.items())


def test_refit_tokens_streamed_equals_in_memory(tmp_path):
    """`--max-memory` small (one layer at a time) gives the same plan, refits and reconstructed
    gate/up projections."""

    folder = saved_checkpoint("qwen2_moe", tmp_path / "src")
    source = doc_corpus(tmp_path)
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    fingerprint = model_fingerprint(checkpoint, layout)
    got = []
    for stream in (False, True):
        options = DataOptions(DataSpec((source,), seq_len=64), max_tokens=512, beam=2,
                              compensate=True, protect_super=False,
                              run=RunOptions(device="cpu", dtype="float32"),
                              stream=stream, hidden_ram=0 if stream else None,
                              refit_tokens=1536)
        choice = choose_with_data(folder, layout, fingerprint, criterion="measured",
                                  ratio=0.5, protect={}, min_experts=None, options=options,
                                  log=lambda _: None)
        assert choice.info["refit_tokens"] == 1536
        got.append(choice.chosen)
    assert got[0].plan.to_dict()["layers"] == got[1].plan.to_dict()["layers"]
    assert got[0].weights and set(got[0].weights) == set(got[1].weights)
    for layer, weights in got[0].weights.items():
        for e, w in weights.items():
            torch.testing.assert_close(torch.as_tensor(got[1].weights[layer][e]),
                                       torch.as_tensor(w))
    assert got[0].gate_up and set(got[0].gate_up) == set(got[1].gate_up)
    for layer, pairs in got[0].gate_up.items():
        assert set(pairs) == set(got[1].gate_up[layer])
        for e, pair in pairs.items():
            for a, b in zip(pair.read(), got[1].gate_up[layer][e].read(), strict=True):
                torch.testing.assert_close(b, a)


def test_reconstruction_uses_the_streamed_refit_positions(tmp_path, monkeypatch):
    """With `--refit-tokens`, the first MoE layer's reconstruction gets every refit position:
    its inputs and target equal a plain capture of selection + extra windows by the unmodified
    model and that model's own routed output there (no earlier layer is pruned: zero drift)."""
    import moekit.layerfit.measured as measured

    folder, model, layout, fingerprint = measured_setup("mixtral", tmp_path)
    source = doc_corpus(tmp_path)
    seen = []
    real = measured.reconstruct_layer

    def spy(layer, experts, inputs, ids, gates, target, kept, steps, **limits):
        seen.append((layer, inputs.clone(), target.clone()))
        return real(layer, experts, inputs, ids, gates, target, kept, steps, **limits)

    monkeypatch.setattr(measured, "reconstruct_layer", spy)
    options = DataOptions(DataSpec((source,), seq_len=64), max_tokens=512, beam=2,
                          compensate=True, protect_super=False,
                          run=RunOptions(device="cpu", dtype="float32"),
                          refit_tokens=2048, reconstruct_steps=20)
    choose_with_data(folder, layout, fingerprint, criterion="measured", ratio=0.5, protect={},
                     min_experts=None, options=options, log=lambda _: None)
    cal = load_calibration(folder, layout, DataSpec((source,), seq_len=64), max_tokens=512,
                           run=RunOptions(device="cpu", dtype="float32"), refit_tokens=2048)
    layer = layout.moe_layers[0].index
    cap = capture_layers(model, layout.family, cal.fit + cal.extra, max_tokens=cal.refit_tokens,
                         layers=[layer])[layer]
    got_layer, inputs, target = seen[0]
    assert got_layer == layer and inputs.shape[0] == cal.refit_tokens > cal.max_tokens
    torch.testing.assert_close(inputs, cap.inputs.float(), rtol=1e-5, atol=1e-6)
    block = next(b for b in moe_blocks(model, layout.family) if b.layer == layer)
    with torch.no_grad():
        want = block.block(cap.inputs.float()[None])
    want = (want[0] if isinstance(want, tuple) else want).reshape(target.shape)
    torch.testing.assert_close(target, want, rtol=1e-4, atol=1e-5)
