"""Merge building blocks against independent computations: neuron alignment, averaging,
output fitting, expert forward vs transformers' experts modules, clustering vs scipy."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_MOE
from transformers import AutoModelForCausalLM

from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.ops.merge.combine import average, fit_down, merge_cluster, reconstruction_error
from moekit.ops.merge.grouping import average_linkage, dominant_clusters
from moekit.surgery.experts import (
    Experts,
    activation,
    expert_format,
    expert_output,
    fused_tensors,
    read_experts,
)

SILU = lambda g, u: torch.nn.functional.silu(g) * u  # noqa: E731


def _experts(num: int, inter: int = 16, hidden: int = 8, bias: bool = False,
             seed: int = 0) -> Experts:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    if not bias:
        return Experts(rand(num, inter, hidden), rand(num, inter, hidden), rand(num, hidden, inter))
    return Experts(rand(num, inter, hidden), rand(num, inter, hidden), rand(num, hidden, inter),
                   rand(num, inter), rand(num, inter), rand(num, hidden))


def _permuted_copy(experts: Experts, perm: torch.Tensor) -> Experts:
    """Expert 0 and a copy of it with its intermediate neurons permuted by `perm`."""
    def pair(t: torch.Tensor | None, axis: int) -> torch.Tensor | None:
        if t is None:
            return None
        return torch.stack([t[0], t[0].index_select(axis, perm)])

    return Experts(pair(experts.gate, 0), pair(experts.up, 0), pair(experts.down, 1),
                   pair(experts.gate_bias, 0), pair(experts.up_bias, 0),
                   None if experts.down_bias is None else experts.down_bias[[0, 0]])


@pytest.mark.parametrize("bias", [False, True])
def test_aligned_merge_of_a_permuted_copy_is_the_expert_exactly(bias):
    experts = _experts(1, bias=bias)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    pair = _permuted_copy(experts, perm)
    x = torch.randn(32, 8)
    # the copy computes the same function, yet its weights differ
    assert torch.allclose(expert_output(pair, 0, x, SILU), expert_output(pair, 1, x, SILU),
                          atol=1e-5)
    assert not torch.equal(pair.gate[0], pair.gate[1])
    merged = merge_cluster(pair, [0.3, 0.7], "aligned")
    for role in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
        value = getattr(experts, role)
        assert (value is None) == (getattr(merged, role) is None)
        if value is not None:
            assert torch.equal(getattr(merged, role)[0], value[0]), role
    plain = merge_cluster(_permuted_copy(experts, perm), [0.3, 0.7], "average")
    assert not torch.allclose(plain.gate[0], experts.gate[0])


def test_average_is_the_usage_weighted_mean():
    experts = _experts(3, bias=True)
    merged = average(experts, [1.0, 2.0, 5.0])
    for role in ("gate", "up", "down", "gate_bias", "down_bias"):
        stack = getattr(experts, role)
        expected = (1 * stack[0] + 2 * stack[1] + 5 * stack[2]) / 8
        assert torch.allclose(getattr(merged, role)[0], expected, atol=1e-6), role


@pytest.mark.parametrize("bias", [False, True])
def test_fitting_lowers_held_out_reconstruction_error(bias):
    """Fit on 2000 tokens, measure on 2000 others: the refit down projection reproduces the
    cluster's gate-weighted output better than the plain (aligned) average."""
    torch.manual_seed(0)
    members = _experts(3, inter=16, hidden=8, bias=bias, seed=1)
    mix = torch.randn(8, 8) / 8 ** 0.5
    x = torch.randn(4000, 8) @ mix + 0.3  # correlated, off-centre inputs
    gates = torch.rand(4000, 3) * (torch.rand(4000, 3) < 0.5)
    train, test = slice(0, 2000), slice(2000, 4000)
    aligned = merge_cluster(members, [1.0, 1.0, 1.0], "aligned")
    fitted = fit_down(aligned, members, x[train], gates[train], SILU)
    before = reconstruction_error(aligned, members, x[test], gates[test], SILU)
    after = reconstruction_error(fitted, members, x[test], gates[test], SILU)
    assert after < 0.9 * before, (before, after)


def test_average_linkage_matches_scipy():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    points = torch.randn(12, 3, generator=torch.Generator().manual_seed(5)).double()
    dist = torch.cdist(points, points)
    for count in (2, 5, 9):
        ours = sorted(sorted(c) for c in average_linkage(dist, list(range(12)), count))
        labels = fcluster(linkage(squareform(dist.numpy(), checks=False), "average"), count,
                          "maxclust")
        theirs = sorted(sorted(int(j) for j in range(12) if labels[j] == lab)
                        for lab in set(labels))
        assert ours == theirs


def test_dominant_clusters_join_the_nearest_centre():
    dist = torch.tensor([[0, 1, 5, 9], [1, 0, 4, 2], [5, 4, 0, 3], [9, 2, 3, 0]]).double()
    clusters = dominant_clusters(dist, [0, 1, 2, 3], [4.0, 1.0, 3.0, 0.5], 2)
    assert sorted(clusters) == [[0, 1], [2, 3]]


def _module_output(model, family, layer: int, x: torch.Tensor, j: int) -> torch.Tensor:
    """f_j(x) from the transformers experts module: expert j only, weight 1."""
    from moekit.calib.hooks import find_moe_modules

    mods = next(m for m in find_moe_modules(model, family) if m.layer == layer)
    ids = torch.full((x.shape[0], 1), j, dtype=torch.long)
    return mods.experts(x, ids, torch.ones(x.shape[0], 1))


FORWARD_TYPES = sorted(t for t in TINY_MOE if t != "llama4_text")  # llama4's experts: own API


@pytest.mark.parametrize("model_type", FORWARD_TYPES)
def test_expert_forward_matches_transformers(model_type, tiny_checkpoint):
    """Reading the on-disk layout (per-expert, fused, transposed, interleaved, biases) and the
    canonical forward give the transformers experts module's output for every expert."""
    folder = tiny_checkpoint(model_type)
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    moe = layout.moe_layers[0]
    experts = read_experts(checkpoint, expert_format(layout, moe))
    x = torch.randn(5, experts.gate.shape[2], generator=torch.Generator().manual_seed(0))
    act = activation(layout)
    with torch.no_grad():
        for j in range(experts.num_experts):
            expected = _module_output(model, layout.family, moe.index, x, j)
            assert torch.allclose(expert_output(experts, j, x, act), expected, atol=1e-5), j


@pytest.mark.parametrize("model_type", ["gpt_oss", "granitemoe", "llama4_text"])
def test_fused_layout_round_trip(model_type, tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint(model_type))
    layout = describe(checkpoint)
    fmt = expert_format(layout, layout.moe_layers[0])
    written = fused_tensors(fmt, read_experts(checkpoint, fmt))
    assert written and all(torch.equal(v, checkpoint.read(k)) for k, v in written.items())


def test_layer_fit_lowers_held_out_error_against_averaging(tiny_checkpoint, tmp_path):
    """Calibration activations of a tiny Mixtral; a plan folding 8 -> 4 experts per layer.
    Fitted on the first half of the tokens, the merged layer reproduces the original layer's
    output on the second half better than the aligned average does (both under the merged
    router)."""
    from moekit.calib.data import DataSource
    from moekit.families.fingerprint import model_fingerprint
    from moekit.ops.merge.calib import capture_calibration
    from moekit.ops.merge.combine import merge_cluster as merge_one
    from moekit.ops.merge.fit import fit_layer, layer_error, merged_routing, routed_output
    from moekit.ops.merge.grouping import build_merge_plan, gram_cosine_distance
    from moekit.surgery.experts import stack

    folder = tiny_checkpoint("mixtral")
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} value{i % 11}" for i in range(3000)))
    calib = capture_calibration(folder, layout, [DataSource("t", text)], max_tokens=1024,
                                seq_len=64)
    moe = layout.moe_layers[0]
    fmt = expert_format(layout, moe)
    experts = read_experts(checkpoint, fmt)
    plan = build_merge_plan(layout, model_fingerprint(checkpoint, layout),
                            lambda _: gram_cosine_distance(experts.gram()), group="weight",
                            method="fit", router="centre", ratio=0.5, stats=None,
                            criterion="random")
    p = plan.layer(moe.index)
    data = calib[moe.index]
    train, test = data.split(0, 512), data.split(512, 1024)
    act = activation(layout)
    averaged = stack([merge_one(experts.select(c), w, "aligned")
                      for c, w in zip(p.clusters, p.weights, strict=True)])
    fitted, _ = fit_layer(experts, averaged, p, train, layout, "centre", {}, act, ridge=1e-2)
    ids, weights = merged_routing(p, test, layout, "centre", {})
    target = routed_output(experts, test.ids, test.weights, test.inputs, act)
    before = layer_error(target, averaged, ids, weights, test.inputs, act)
    after = layer_error(target, fitted, ids, weights, test.inputs, act)
    assert after < 0.97 * before, (before, after)  # measured: 0.889 -> 0.849


def test_weight_distance_from_gram_is_the_cosine_of_flattened_experts():
    from moekit.ops.merge.grouping import cosine_distance, gram_cosine_distance

    experts = _experts(5, bias=True)
    flat = torch.cat([t.reshape(5, -1) for t in (experts.gate, experts.up, experts.down,
                                                  experts.gate_bias, experts.up_bias,
                                                  experts.down_bias)], dim=1)
    expected = 1 - torch.nn.functional.cosine_similarity(flat.double().unsqueeze(1),
                                                         flat.double().unsqueeze(0), dim=2)
    assert torch.allclose(gram_cosine_distance(experts.gram()), expected, atol=1e-6)
    assert torch.allclose(cosine_distance(flat), expected, atol=1e-9)
