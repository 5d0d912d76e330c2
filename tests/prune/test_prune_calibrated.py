"""End to end: what measured selection (+ refit, + neuron trimming) computes in memory is what the
written checkpoint does. The reference is the in-memory model with the plan applied through
`override.PrunedLayers` and the refitted weights set; the checkpoint is written by the surgery
with the refitted/trimmed tensors and loaded back by transformers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from support import choose, doc_corpus, in_memory_logits, saved_checkpoint
from tiny_models import _docstring_corpus

from moekit.calib.data import DataSource
from moekit.calib.spec import DataSpec
from moekit.errors import DataError
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.layerfit.measured import load_calibration
from moekit.ops.prune import prune_checkpoint
from moekit.ops.prune.calibrated import DataOptions, choose_with_data
from moekit.ops.prune.rewrite import modified_tensors
from moekit.ops.prune.trim import budget_split, trimmed_tensors
from moekit.runtime.loading import load_model
from moekit.runtime.options import RunOptions


@pytest.mark.parametrize("model_type,trim", [("mixtral", False), ("qwen2_moe", True),
                                             ("gpt_oss", True), ("mixtral", True),
                                             ("deepseek_v3", False), ("gpt_oss", False),
                                             ("qwen2_moe", False)])
def test_written_checkpoint_equals_in_memory_plan(model_type, trim, tmp_path):
    folder = saved_checkpoint(model_type, tmp_path / "src")
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    num = layout.moe_layers[0].num_experts
    width_key = layout.family.keys.expert_width[0]
    old_width = int(layout.config[width_key])
    if trim:
        n_drop, width = budget_split(num, old_width, 0.5, layout.top_k())
        assert (num - n_drop) * width <= 0.5 * num * old_width
    else:
        n_drop, width = 2, None
    candidate = choose(folder, doc_corpus(tmp_path), n_drop / num, width=width).chosen
    assert candidate.plan.num_dropped == n_drop
    if trim:
        assert all(len(c) == width for layer in candidate.neurons.values()
                   for c in layer.values())
        modified = trimmed_tensors(checkpoint, layout, candidate.plan, candidate.neurons,
                                   candidate.weights)
    else:
        assert candidate.weights, "expected at least one refitted layer"
        modified, rows = modified_tensors(checkpoint, layout, candidate.plan,
                                          candidate.weights, candidate.rel_change,
                                          candidate.routers, candidate.gate_up)
        assert rows and all(r["rel_change"] > 0 for r in rows)
        assert any(r.get("reconstructed") for r in rows)
        assert candidate.gate_up, "expected the reconstruction to help in some layer"
    prune_checkpoint(folder, candidate.plan, tmp_path / "out", modified=modified,
                     expert_width=width)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[width_key] == (width if trim else old_width)
    batch = torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(3))
    expected = in_memory_logits(folder, candidate, batch)
    with torch.no_grad():
        got = load_model(tmp_path / "out", "cpu", "float32")(batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_trimmed_expert_without_a_refit_keeps_its_own_down_columns(model_type, tmp_path):
    """A kept expert that got no refit (no calibration token reached it) is trimmed with its
    own down projection's chosen columns (it used to fail at the write: 'no tensor 3')."""
    folder = saved_checkpoint(model_type, tmp_path / "src")
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    num, width_key = layout.moe_layers[0].num_experts, layout.family.keys.expert_width[0]
    n_drop, width = budget_split(num, int(layout.config[width_key]), 0.5, layout.top_k())
    candidate = choose(folder, doc_corpus(tmp_path), n_drop / num, width=width).chosen
    layer = layout.moe_layers[0]
    kept = candidate.plan.layer(layer.index).kept
    e = kept[0]
    weights = {i: dict(w) for i, w in candidate.weights.items()}
    weights.setdefault(layer.index, {}).pop(e, None)         # no refit for expert e
    modified = trimmed_tensors(checkpoint, layout, candidate.plan, candidate.neurons, weights)
    cols = candidate.neurons[layer.index][e]
    name = layout.family.experts.projections["down"]
    down = (next(k for k in layer.fused_keys if k.endswith(".down_proj")) if layer.fused_keys
            else next(k for k in layer.expert_keys[e] if k.endswith(f".{name}.weight")))
    got = modified[down].produce()
    original = checkpoint.read(down).float()
    if layer.fused_keys:                                  # gpt-oss: down_proj [E, I, H]
        expected, got = original[e].index_select(0, cols), got[0].float()
    else:                                                 # mixtral: w2 [H, I] per expert
        expected, got = original.index_select(1, cols), got.float()
    torch.testing.assert_close(got, expected)


def test_short_sources_still_hold_out_a_window_or_fail_in_one_line(tmp_path):
    """Each source yields 2 windows: one is held out (before, both were fitted and every
    candidate scored KL 0); sources of one window each cannot score candidates: DataError."""
    folder = saved_checkpoint("mixtral", tmp_path / "src")
    layout = describe(Checkpoint(folder))
    words = " ".join(_docstring_corpus()).split()
    sources = []
    for n in range(3):
        path = tmp_path / f"t{n}.txt"
        path.write_text(" ".join(words[n * 400:(n + 1) * 400]))
        sources.append(DataSource(f"d{n}", path))
    cal = load_calibration(folder, layout, DataSpec(tuple(sources), seq_len=16), max_tokens=16,
                           run=RunOptions(device="cpu", dtype="float32"))
    assert [int(w.numel()) for w in cal.held] == [16, 16, 16]  # one window of each source
    assert len(cal.fit) >= 1
    options = DataOptions(DataSpec(tuple(sources), seq_len=16), max_tokens=16, beam=1,
                          protect_super=False,
                          run=RunOptions(device="cpu", dtype="float32", max_memory=None))
    chosen = choose_with_data(folder, layout, "x", criterion="measured", ratio=0.25,
                              protect={}, min_experts=None, options=options, log=lambda _: None)
    assert len({round(c.kl, 12) for c in chosen.candidates}) > 1  # told apart, not all 0
    one_window = []
    for n in range(2):
        path = tmp_path / f"s{n}.txt"
        path.write_text(" ".join(words[:3]))
        one_window.append(DataSource(f"s{n}", path))
    options = replace(options, data=DataSpec(tuple(one_window), seq_len=16))
    with pytest.raises(DataError, match="too short to hold out"):
        choose_with_data(folder, layout, "x", criterion="measured", ratio=0.25, protect={},
                         min_experts=None, options=options, log=lambda _: None)
