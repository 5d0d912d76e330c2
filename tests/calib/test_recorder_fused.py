"""The recorder's queued, fused updates (batches summed together at a flush: one float64
index_add for tokens/weight/EAN/REAP, one float32 index_add for the per-window counts and REAP
sums; entropy by subtraction) record the same values as one operation per statistic and batch
(the formulas of the module docstring, written out as the recorder computed them before), bit
for bit on the CPU, whatever the flush points; and the same sums as plain Python loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.calib.recorder import Recorder

MIXED = [(3, 17), (1, 40), (2, 9), (5, 1)]
UNIFORM = [(4, 16), (4, 16), (2, 16)]


def _batches(seed: int, num_experts: int, k: int, dtype: torch.dtype, shapes=MIXED):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch, seq in shapes:
        tokens = batch * seq
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)])
        weights = torch.rand(tokens, k, generator=gen).to(dtype)
        norms = torch.rand(tokens, k, generator=gen) * 7
        logits = torch.randn(tokens, num_experts, generator=gen).to(dtype)
        out.append(((batch, seq), ids, weights, norms, logits))
    return out


def _reference(batches, num_experts: int, scoring: str, contributions: bool) -> dict:
    """One tensor operation per statistic and batch, as the documented formulas read."""
    f64 = torch.float64
    e = num_experts
    ref = {name: torch.zeros(e, dtype=f64) for name in ("weight", "ean", "reap", "max")}
    ref["tokens"] = torch.zeros(e, dtype=torch.int64)
    ref["coact"] = torch.zeros(e * e, dtype=torch.int64)
    ref["entropy"], ref["repeats"], counts, sums = torch.zeros(1, dtype=f64), 0, [], []
    for (batch, seq), ids, weights, norms, logits in batches:
        flat, w64, n64 = ids.reshape(-1), weights.reshape(-1).to(f64), norms.reshape(-1).to(f64)
        reap = (weights * 0.5 + norms).reshape(-1).to(f64) if contributions else w64 * n64
        ref["tokens"].index_add_(0, flat, torch.ones_like(flat))
        ref["weight"].index_add_(0, flat, w64)
        ref["ean"].index_add_(0, flat, n64)
        ref["reap"].index_add_(0, flat, reap)
        ref["max"].scatter_reduce_(0, flat, n64, reduce="amax")
        pairs = (ids.unsqueeze(2) * e + ids.unsqueeze(1)).reshape(-1)
        ref["coact"].index_add_(0, pairs, torch.ones_like(pairs))
        if seq > 1:
            top1 = ids.gather(1, weights.argmax(dim=1, keepdim=True)).view(batch, seq)
            ref["repeats"] += int((top1[:, 1:] == top1[:, :-1]).sum())
        row = torch.arange(ids.shape[0]) // seq
        slot = (row.unsqueeze(1) * e + ids).reshape(-1)
        count = torch.zeros(batch * e, dtype=torch.int32)
        count.index_add_(0, slot, torch.ones_like(slot, dtype=torch.int32))
        total = torch.zeros(batch * e, dtype=torch.float32)
        total.index_add_(0, slot, reap.to(torch.float32))
        counts.append(count.view(batch, e))
        sums.append(total.view(batch, e))
        z = logits.float()
        if scoring == "sigmoid":
            logp = torch.nn.functional.logsigmoid(z)
            logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
        else:
            logp = torch.log_softmax(z, dim=-1)
        ref["entropy"].add_((-(logp.exp() * logp).sum(dim=-1)).sum().to(f64))
    ref["windows"] = (torch.cat(counts).numpy(), torch.cat(sums).numpy())
    return ref


@pytest.mark.parametrize(("dtype", "scoring", "contributions", "shapes", "queue"), [
    (torch.float32, "softmax", False, MIXED, None), (torch.bfloat16, "sigmoid", False, MIXED, 7),
    (torch.float32, "softmax", True, UNIFORM, None),
    (torch.float64, "softmax", False, UNIFORM, 100),
    (torch.float32, "softmax", True, MIXED, 150)])
def test_fused_updates_equal_the_per_statistic_formulas(dtype, scoring, contributions, shapes,
                                                        queue, monkeypatch):
    """`queue`: QUEUE_SLOTS (None: the default, one flush at the end; 7: every batch)."""
    import moekit.calib.recorder as recorder

    if queue is not None:
        monkeypatch.setattr(recorder, "QUEUE_SLOTS", queue)
    num_experts, k = 12, 3
    batches = _batches(0, num_experts, k, dtype, shapes)
    recorder = Recorder(num_domains=2)
    acc = recorder.add_layer(0, num_experts, "cpu")
    for shape, ids, weights, norms, logits in batches:
        extra = (weights * 0.5 + norms) if contributions else None
        acc.add_routing(1, shape, ids, weights, norms, extra)
        acc.add_entropy(1, logits, scoring)
    raw = recorder.finish()[0]
    ref = _reference(batches, num_experts, scoring, contributions)
    np.testing.assert_array_equal(raw.tokens[1], ref["tokens"].numpy())
    assert raw.tokens.dtype == np.int64 and not raw.tokens[0].any()
    for name, key in [("weight_sum", "weight"), ("ean_sum", "ean"), ("reap_sum", "reap"),
                      ("max_norm", "max")]:
        np.testing.assert_array_equal(getattr(raw, name)[1], ref[key].numpy(), err_msg=name)
    np.testing.assert_array_equal(raw.coact[1].reshape(-1), ref["coact"].numpy())
    np.testing.assert_array_equal(raw.entropy_sum[1:], ref["entropy"].numpy())
    assert int(raw.top1_repeats[1]) == ref["repeats"]
    assert raw.window_tokens[1].dtype == np.int32 and raw.window_reap[1].dtype == np.float32
    np.testing.assert_array_equal(raw.window_tokens[1], ref["windows"][0])
    np.testing.assert_array_equal(raw.window_reap[1], ref["windows"][1])
    assert raw.window_tokens[0].shape == (0, num_experts)


def test_fused_updates_equal_python_loops():
    """Independent of torch's scatter kernels: slot by slot in float64 Python."""
    num_experts, k = 6, 2
    batches = _batches(1, num_experts, k, torch.float32)
    recorder = Recorder(num_domains=1)
    acc = recorder.add_layer(3, num_experts, "cpu")
    tokens = np.zeros(num_experts, np.int64)
    reap = np.zeros(num_experts)
    coact = np.zeros((num_experts, num_experts), np.int64)
    for shape, ids, weights, norms, _ in batches:
        acc.add_routing(0, shape, ids, weights, norms)
        for t in range(ids.shape[0]):
            for s in range(k):
                e = int(ids[t, s])
                tokens[e] += 1
                reap[e] += float(weights[t, s]) * float(norms[t, s])
                for s2 in range(k):
                    coact[e, int(ids[t, s2])] += 1
    raw = recorder.finish()[0]
    np.testing.assert_array_equal(raw.tokens[0], tokens)
    np.testing.assert_allclose(raw.reap_sum[0], reap, rtol=1e-12)
    np.testing.assert_array_equal(raw.coact[0], coact)
    assert np.array_equal(np.diagonal(coact), tokens)
    assert raw.window_tokens[0].sum() == tokens.sum()
    np.testing.assert_allclose(raw.window_reap[0].sum(0), reap, rtol=1e-5)


def test_queue_recorded_in_inference_mode_is_summed_outside_it():
    """Accumulators made and fed under torch.inference_mode (as a forward pass runs), finished
    after it: the flush may update inference tensors in place."""
    with torch.inference_mode():
        recorder = Recorder(num_domains=1)
        acc = recorder.add_layer(0, 4, "cpu")
        acc.add_routing(0, (1, 3), torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.ones(3, 2),
                        torch.full((3, 2), 2.0))
    raw = recorder.finish()[0]
    np.testing.assert_array_equal(raw.tokens[0], [2, 2, 1, 1])
    np.testing.assert_array_equal(raw.reap_sum[0], [4.0, 4.0, 2.0, 2.0])
    np.testing.assert_array_equal(raw.window_tokens[0], [[2, 2, 1, 1]])
