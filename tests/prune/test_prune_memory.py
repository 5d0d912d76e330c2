"""The per-layer working set of measured selection is built in token chunks; chunking changes
no result. The reference is the former computation: every cached expert output at once as
float32 [N, M, H], then the Gram matrices, cross terms and ||y_E||^2 from it in float64."""

from __future__ import annotations

import pytest
import torch
from support import measured_setup, random_tokens

import moekit.layerfit.replay as replay_mod
from moekit.calib.capture import capture_layers, moe_blocks
from moekit.calib.routing import Routing, selection_bias
from moekit.layerfit.replay import build_replay, cached_candidates, expert_outputs


def _former(block, cap, routing, n_drop):
    """(outs [N, M, H] float32, y_E, G, c, ||y_E||^2) as computed before chunking."""
    logits = cap.logits.float()
    bias = selection_bias(block.block)
    bias = bias.float() if bias is not None else None
    cand = cached_candidates(logits, routing, bias, n_drop)
    num, m = cand.shape
    rows = cap.inputs.repeat_interleave(m, dim=0)
    with torch.no_grad():
        outs = block.experts(rows, cand.reshape(-1, 1), torch.ones(num * m, 1,
                                                                   dtype=rows.dtype))
    outs = outs.float().view(num, m, -1)
    from moekit.calib.routing import route

    ids, w = route(logits, routing, bias, None)
    slot = torch.full(logits.shape, -1, dtype=torch.long)
    slot.scatter_(1, cand, torch.arange(m).expand_as(cand).contiguous())
    picked = outs.gather(1, slot.gather(1, ids).unsqueeze(-1).expand(-1, -1, outs.shape[-1]))
    target = (picked * w.unsqueeze(-1)).sum(1)
    wide = outs.double()
    return (outs, target, wide @ wide.transpose(1, 2),
            (wide * target.double().unsqueeze(1)).sum(-1), target.double().pow(2).sum(-1))


@pytest.mark.parametrize("model_type,dtype", [("mixtral", torch.float32),
                                              ("deepseek_v3", torch.float32),
                                              ("gpt_oss", torch.float32),
                                              ("qwen2_moe", torch.bfloat16)])
def test_chunked_replay_equals_the_former_whole_one(model_type, dtype, tmp_path, monkeypatch):
    _, model, layout, _ = measured_setup(model_type, tmp_path)
    model = model.to(dtype)
    routing = Routing.of(layout.family, layout.config)
    block = moe_blocks(model, layout.family)[-1]
    cap = capture_layers(model, layout.family, random_tokens(3), max_tokens=96,
                         layers=[block.layer])[block.layer]
    outs, target, gram, cross, tnorm = _former(block, cap, routing, 2)
    hidden = outs.shape[-1]
    row = outs.shape[1] * hidden
    monkeypatch.setattr(replay_mod, "EXPERT_BYTES", 4 * row * 20)  # 20 tokens per experts call
    monkeypatch.setattr(replay_mod, "CHUNK_BYTES", 8 * row * 7)  # 7 tokens per float64 block
    assert len(replay_mod.chunks(96, row, 20 * row)) == 5
    got = build_replay(block.experts, cap.inputs, cap.logits, selection_bias(block.block),
                       routing, routing, 2, keep_outputs=True)
    lean = build_replay(block.experts, cap.inputs, cap.logits, selection_bias(block.block),
                        routing, routing, 2)
    assert got.outs.dtype == dtype and lean.outs is None  # M <= GRAM_MAX: outputs not held
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2,
                                                                      "atol": 1e-3}
    torch.testing.assert_close(got.outs.float(), outs, **tol)
    torch.testing.assert_close(expert_outputs(block.experts, cap.inputs, got.cand), outs, **tol)
    for replay in (got, lean):
        torch.testing.assert_close(replay.target, target, **tol)
        torch.testing.assert_close(replay.gram, gram, **tol)
        torch.testing.assert_close(replay.cross, cross, **tol)
        torch.testing.assert_close(replay.tnorm, tnorm, **tol)
    num = routing.top_k + 2
    keep = [e for e in range(int(block.experts.num_experts)) if e not in (0, num)]
    assert lean.error(keep) == pytest.approx(got.error(keep), rel=1e-6)
    monkeypatch.setattr(replay_mod, "gram_fits", lambda m, hidden: False)  # outputs, no Gram
    plain = build_replay(block.experts, cap.inputs, cap.logits, selection_bias(block.block),
                         routing, routing, 2)
    assert plain.gram is None and plain.outs is not None
    assert plain.error(keep) == pytest.approx(got.error(keep), rel=1e-4)


def test_many_cached_outputs_use_gram_terms_at_real_widths(monkeypatch):
    """M = k + n_drop = 68 > GRAM_MAX cached outputs per token at H = 256: the Gram [M, M]
    is smaller than the outputs [M, H], so D comes from Gram terms (no N x M x H outputs held;
    Qwen3-30B-A3B at 50 %: M = 72, H = 2048), and equals D from the outputs themselves."""
    from tiny_models import build_model

    from moekit.families.registry import resolve

    model = build_model("qwen3_moe", hidden_size=256, num_experts=96, num_experts_per_tok=4,
                        moe_intermediate_size=16, num_hidden_layers=1).eval()
    family = resolve(model.config.to_dict()).family
    routing = Routing.of(family, model.config.to_dict())
    block = moe_blocks(model, family)[0]
    cap = capture_layers(model, family, random_tokens(3), max_tokens=96,
                         layers=[block.layer])[block.layer]
    lean = build_replay(block.experts, cap.inputs, cap.logits, None, routing, routing, 64)
    assert lean.cand.shape[1] == 68 > replay_mod.GRAM_MAX
    assert lean.gram is not None and lean.outs is None
    monkeypatch.setattr(replay_mod, "gram_fits", lambda m, hidden: False)
    plain = build_replay(block.experts, cap.inputs, cap.logits, None, routing, routing, 64)
    assert plain.gram is None and plain.outs is not None
    for shift in (0, 17, 40):
        keep = [e for e in range(96) if (e + shift) % 3]  # 64 kept of 96
        assert lean.error(keep) == pytest.approx(plain.error(keep), rel=1e-5)
