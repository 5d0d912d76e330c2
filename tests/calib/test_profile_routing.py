"""Routing statistics on tiny checkpoints of every family vs independent recomputations.

Reference: each family's routing re-implemented here (float64) from the router logits that
`output_router_logits=True` returns, and each expert recomputed from the weights on disk.
Tokens whose top-k boundary is a near-tie (gap < TIE) are compared only through the trace.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import TINY_MOE

from moekit.calib.hooks import RoutingHooks
from moekit.calib.recorder import Recorder
from moekit.families.layout import describe
from moekit.families.registry import resolve
from moekit.io.reader import Checkpoint
from moekit.runtime.loading import load_model

TIE = 1e-6
SIGMOID_BIAS_FAMILIES = ("deepseek_v3", "glm4_moe", "minimax_m2", "ernie4_5_moe")


# ----------------------------------------------------------------------------- reference routing
def _topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] of the k largest scores and a near-tie flag at the k / k+1 boundary."""
    ordered, ids = torch.sort(scores, dim=-1, descending=True)
    tie = torch.zeros(scores.shape[0], dtype=torch.bool)
    if scores.shape[1] > k:
        kth, nxt = ordered[:, k - 1], ordered[:, k]
        tie = torch.isfinite(kth) & ((kth - nxt).abs() < TIE)
    return ids[:, :k], tie


def _groups(scores: torch.Tensor, cfg, k_in_group: int,
            per: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek group-limited selection mask [T, E] and a tie flag on the group boundary."""
    t, e = scores.shape
    grouped = scores.view(t, cfg.n_group, e // cfg.n_group)
    if per == "max":
        group_score = grouped.max(dim=-1).values
    else:
        group_score = grouped.topk(k_in_group, dim=-1).values.sum(dim=-1)
    keep, tie = _topk(group_score, cfg.topk_group)
    mask = torch.zeros(t, cfg.n_group, dtype=torch.bool).scatter_(1, keep, True)
    return mask.repeat_interleave(e // cfg.n_group, dim=1), tie


def reference_route(name: str, z: torch.Tensor, bias: torch.Tensor | None, cfg,
                    k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [T, k], weights [T, k], tie [T]) for router logits z [T, E] of family `name`."""
    z = z.double()
    if name in ("mixtral", "qwen3_5_moe", "hunyuan_v1_moe", "qwen2_moe", "qwen3_moe",
                "qwen3_next", "olmoe"):
        p = z.softmax(-1)
        ids, tie = _topk(p, k)
        w = p.gather(1, ids)
        renorm = name in ("mixtral", "qwen3_5_moe", "hunyuan_v1_moe") or cfg.norm_topk_prob
        return ids, (w / w.sum(-1, keepdim=True) if renorm else w), tie
    if name == "deepseek_v2":
        p = z.softmax(-1)
        tie_g = torch.zeros(len(z), dtype=torch.bool)
        if cfg.topk_method == "group_limited_greedy":
            mask, tie_g = _groups(p, cfg, 1, "max")
            p = p.masked_fill(~mask, 0.0)
        ids, tie = _topk(p, k)
        return ids, p.gather(1, ids) * cfg.routed_scaling_factor, tie | tie_g
    if name in ("deepseek_v3", "glm4_moe"):
        s = z.sigmoid()
        choice = s + bias.double()
        mask, tie_g = _groups(choice, cfg, 2, "sum2")
        ids, tie = _topk(choice.masked_fill(~mask, -math.inf), k)
        w = s.gather(1, ids)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return ids, w * cfg.routed_scaling_factor, tie | tie_g
    if name == "minimax_m2":
        s = z.sigmoid()
        ids, tie = _topk(s + bias.double(), k)
        w = s.gather(1, ids)
        return ids, w / w.sum(-1, keepdim=True), tie
    if name == "ernie4_5_moe":
        p = z.softmax(-1)
        ids, tie = _topk(p + bias.double().reshape(-1), k)
        w = p.gather(1, ids)
        return ids, w / w.sum(-1, keepdim=True).clamp(min=cfg.moe_norm_min), tie
    if name in ("gpt_oss", "granitemoe"):
        ids, tie = _topk(z, k)
        return ids, z.gather(1, ids).softmax(-1), tie
    if name == "llama4":
        ids, tie = _topk(z, k)
        return ids, z.gather(1, ids).sigmoid(), tie
    if name == "phimoe":
        return _sparsemixer(z, cfg.router_jitter_noise)
    raise AssertionError(f"no reference routing for {name}")


def _sparsemixer(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE top-2 at inference: argmax, masked softmax around it, then the runner-up."""
    ids, weights = [], []
    scores = z.clone()
    for _ in range(2):
        top, first = scores.max(dim=-1, keepdim=True)
        far = ((top - z) / z.abs().clamp(min=top)) > 2 * eps
        weights.append(scores.masked_fill(far, -math.inf).softmax(-1).gather(1, first))
        ids.append(first)
        scores = scores.scatter(1, first, -math.inf)
    _, tie = _topk(z, 2)
    first_tie = (z.topk(2, dim=-1).values.diff(dim=-1).abs().squeeze(1) < TIE)
    return torch.cat(ids, 1), torch.cat(weights, 1), tie | first_tie


# ------------------------------------------------------------------------ experts from disk
def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def expert_fn(name: str, checkpoint: Checkpoint, layer, family, cfg):
    """f(x [N, H], e) -> [N, H] computed from the tensors on disk, in float64."""
    read = {k: checkpoint.read(k).double() for k in (*layer.fused_keys, *layer.routed_keys)}
    if name == "gpt_oss":
        gu, gub = read[layer.prefix + "mlp.experts.gate_up_proj"], read[
            layer.prefix + "mlp.experts.gate_up_proj_bias"]
        dn, dnb = read[layer.prefix + "mlp.experts.down_proj"], read[
            layer.prefix + "mlp.experts.down_proj_bias"]

        def f(x, e):
            h = x @ gu[e] + gub[e]
            gate, up = h[:, 0::2].clamp(max=cfg.swiglu_limit), h[:, 1::2].clamp(
                -cfg.swiglu_limit, cfg.swiglu_limit)
            return ((up + 1) * gate * torch.sigmoid(gate * cfg.swiglu_alpha)) @ dn[e] + dnb[e]
        return f
    if name == "llama4":
        gu = read[layer.prefix + "feed_forward.experts.gate_up_proj"]
        dn = read[layer.prefix + "feed_forward.experts.down_proj"]

        def f(x, e):
            gate, up = (x @ gu[e]).chunk(2, dim=-1)
            return (_silu(gate) * up) @ dn[e]
        return f
    if name == "granitemoe":
        inp = read[layer.prefix + "block_sparse_moe.input_linear.weight"]
        out = read[layer.prefix + "block_sparse_moe.output_linear.weight"]

        def f(x, e):
            gate, up = (x @ inp[e].T).chunk(2, dim=-1)
            return (_silu(gate) * up) @ out[e].T
        return f
    names = family.experts.projections

    def f(x, e):
        keys = layer.expert_keys[e]
        get = {role: read[next(k for k in keys if k.endswith(f".{names[role]}.weight"))]
               for role in ("gate", "up", "down")}
        return (_silu(x @ get["gate"].T) * (x @ get["up"].T)) @ get["down"].T
    return f


# --------------------------------------------------------------------------------- the run
def _bias_of(model, family, layer_index: int) -> torch.Tensor | None:
    if not family.router.selection_bias:
        return None
    for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
        if f"layers.{layer_index}." in name and name.endswith("e_score_correction_bias"):
            return tensor.detach()
    raise AssertionError("selection bias not found")


def _run(model_type: str, tiny_checkpoint):
    folder = tiny_checkpoint(model_type)
    model = load_model(folder, "cpu", "float32")
    family = resolve(model.config.to_dict()).family
    generator = torch.Generator().manual_seed(1)
    if family.name in SIGMOID_BIAS_FAMILIES:  # random selection biases exercise the +bias path
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                tensor.data.copy_(torch.randn(tensor.shape, generator=generator) * 0.03)
    batches = [torch.randint(3, 256, (2, 12), generator=generator),
               torch.randint(3, 256, (1, 7), generator=generator)]
    inputs: dict[int, list[torch.Tensor]] = {}
    recorder = Recorder(num_domains=1, trace=True)
    logits_seen: list[list[torch.Tensor]] = []
    with RoutingHooks(model, family, recorder) as hooks, torch.no_grad():
        grabs = [m.router.register_forward_pre_hook(
            lambda mod, args, i=m.layer: inputs.setdefault(i, []).append(
                args[0].reshape(-1, args[0].shape[-1]).double())) for m in hooks.modules]
        for batch in batches:
            recorder.set_batch(0, tuple(batch.shape))
            out = model(batch, output_router_logits=True, use_cache=False)
            logits_seen.append([z.detach() for z in out.router_logits])
        for grab in grabs:
            grab.remove()
    return model, family, folder, recorder.finish(), inputs, logits_seen, batches


@pytest.mark.parametrize("model_type", list(TINY_MOE))
def test_counts_weights_and_norms_match_reference(model_type, tiny_checkpoint):
    model, family, folder, raw, inputs, logits_seen, batches = _run(model_type, tiny_checkpoint)
    cfg = model.config.get_text_config()
    checkpoint = Checkpoint(folder)
    disk_layers = {layer.index: layer for layer in describe(checkpoint).moe_layers}
    assert [r.layer for r in raw] == sorted(disk_layers)
    for position, layer_raw in enumerate(raw):
        i, num_experts = layer_raw.layer, layer_raw.num_experts
        z = torch.cat([seen[position] for seen in logits_seen])
        k = layer_raw.trace[0][0].shape[1]
        ids, w, tie = reference_route(family.name, z, _bias_of(model, family, i), cfg, k)
        got_ids = torch.from_numpy(layer_raw.trace[0][0].astype(np.int64))
        got_w = torch.from_numpy(layer_raw.trace[0][1]).double()
        assert tie.float().mean() < 0.2, "too many near-ties for a meaningful comparison"
        ok = ~tie
        ref_sorted, order = ids.sort(dim=1)
        got_sorted, got_order = got_ids.sort(dim=1)
        assert torch.equal(ref_sorted[ok], got_sorted[ok]), f"layer {i}: top-k ids differ"
        torch.testing.assert_close(got_w.gather(1, got_order)[ok], w.gather(1, order)[ok],
                                   rtol=1e-5, atol=1e-6)
        counts = np.bincount(got_ids.reshape(-1).numpy(), minlength=num_experts)
        np.testing.assert_array_equal(layer_raw.tokens[0], counts)
        if not tie.any():
            np.testing.assert_array_equal(layer_raw.tokens[0], np.bincount(
                ids.reshape(-1).numpy(), minlength=num_experts))
        # REAP / EAN from the weights on disk
        f = expert_fn(family.name, checkpoint, disk_layers[i], family, cfg)
        x = torch.cat(inputs[i])
        ean, reap, top = np.zeros(num_experts), np.zeros(num_experts), np.zeros(num_experts)
        for t in range(x.shape[0]):
            for s in range(k):
                e, weight = int(got_ids[t, s]), float(got_w[t, s])
                norm = float(f(x[t:t + 1], e).norm())
                ean[e] += norm
                top[e] = max(top[e], norm)
                reap[e] += (float(f(weight * x[t:t + 1], e).norm()) if family.router.input_scaled
                            else weight * norm)
        np.testing.assert_allclose(layer_raw.ean_sum[0], ean, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(layer_raw.reap_sum[0], reap, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(layer_raw.max_norm[0], top, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(layer_raw.weight_sum[0], np.bincount(
            got_ids.reshape(-1).numpy(), weights=got_w.reshape(-1).numpy(), minlength=num_experts),
            rtol=1e-9)
        _check_layer_sums(family, layer_raw, z, got_ids, got_w, batches)


def _check_layer_sums(family, layer_raw, z, ids, w, batches) -> None:
    """Co-activation, entropy and top-1 reuse recomputed from the trace and the logits."""
    num_experts = layer_raw.num_experts
    pairs = np.zeros((num_experts, num_experts), dtype=np.int64)
    for row in ids.numpy():
        for a in row:
            for b in row:
                pairs[a, b] += 1
    np.testing.assert_array_equal(layer_raw.coact[0], pairs)
    if family.router.scoring == "sigmoid":
        s = z.double().sigmoid()
        p = s / s.sum(-1, keepdim=True)
    else:
        p = z.double().softmax(-1)
    entropy = float(-(p * p.log()).sum())
    assert layer_raw.entropy_sum[0] == pytest.approx(entropy, rel=1e-5)
    assert layer_raw.positions[0] == sum(b.numel() for b in batches)
    top1 = ids.gather(1, w.argmax(1, keepdim=True)).squeeze(1)
    repeats, pairs_count, start = 0, 0, 0
    for batch in batches:
        rows, seq = batch.shape
        block = top1[start:start + rows * seq].view(rows, seq)
        repeats += int((block[:, 1:] == block[:, :-1]).sum())
        pairs_count += rows * (seq - 1)
        start += rows * seq
    assert int(layer_raw.top1_repeats[0]) == repeats
    assert int(layer_raw.top1_pairs[0]) == pairs_count


@pytest.mark.parametrize("model_type", list(TINY_MOE))
def test_recording_leaves_logits_bit_identical(model_type, tiny_checkpoint):
    """The trace experts implementation reuses the model's own kernel: logits are equal, not
    merely close (grouped_mm default; Llama-4 is only observed by hooks)."""
    model = load_model(tiny_checkpoint(model_type), "cpu", "float32")
    family = resolve(model.config.to_dict()).family
    batch = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    before = model.config._experts_implementation
    with torch.no_grad():
        plain = model(batch).logits
        recorder = Recorder(num_domains=1)
        with RoutingHooks(model, family, recorder):
            recorder.set_batch(0, tuple(batch.shape))
            hooked = model(batch).logits
        after = model(batch).logits
    assert torch.equal(plain, hooked)
    assert torch.equal(plain, after)
    assert model.config._experts_implementation == before
    assert recorder.finish()[0].tokens.sum() > 0  # the hooks did record


def test_eager_experts_implementation_is_wrapped_too(tiny_checkpoint):
    """With eager experts the trace path wraps the eager loop: same top-k, logits within 1e-6
    (summation order may differ), identical counts to the grouped_mm run."""
    model = load_model(tiny_checkpoint("qwen3_moe"), "cpu", "float32")
    family = resolve(model.config.to_dict()).family
    batch = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    results = {}
    for impl in ("grouped_mm", "eager"):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            plain = model(batch).logits
            recorder = Recorder(num_domains=1)
            with RoutingHooks(model, family, recorder):
                recorder.set_batch(0, tuple(batch.shape))
                hooked = model(batch).logits
        torch.testing.assert_close(hooked, plain, rtol=0, atol=1e-6)
        assert model.config._experts_implementation == impl
        results[impl] = recorder.finish()
    for a, b in zip(results["grouped_mm"], results["eager"], strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.reap_sum, b.reap_sum, rtol=1e-5)
