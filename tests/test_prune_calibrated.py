"""End to end: what measured selection (+ refit, + neuron trimming) computes in memory is what the
written checkpoint does. The reference is the in-memory model with the plan applied through
`override.PrunedLayers` and the refitted weights set; the checkpoint is written by the surgery
with the refitted/trimmed tensors and loaded back by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from test_prune_measured import _saved
from tiny_models import _docstring_corpus

from moekit.calib.data import DataSource
from moekit.families.layout import describe
from moekit.io.fingerprint import model_fingerprint
from moekit.io.reader import Checkpoint
from moekit.ops.prune import prune_checkpoint
from moekit.ops.prune.measured import apply_fit, load_calibration, restore_weights
from moekit.ops.prune.override import PrunedLayers
from moekit.ops.prune.quality import measured_plan
from moekit.ops.prune.rewrite import modified_tensors
from moekit.ops.prune.trim import budget_split, trimmed_tensors
from moekit.runtime.loading import load_model


def _calibrated(model_type: str, tmp_path):
    folder = _saved(model_type, tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(_docstring_corpus()[:1500]))
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    cal = load_calibration(folder, layout, [DataSource("doc", text)], fraction=(0, 1),
                           seq_len=64, max_tokens=1024, device="cpu", dtype="float32")
    return folder, layout, model_fingerprint(checkpoint, layout), cal


def _in_memory_logits(cal, candidate, batch: torch.Tensor) -> torch.Tensor:
    from moekit.ops.prune.compensate import LayerFit

    with PrunedLayers() as pruned, torch.no_grad():
        try:
            for p in candidate.plan.layers:
                block = cal.block(p.layer)
                pruned.add(block, p.kept, cal.routing.after_prune(candidate.plan.config_changes),
                           cal.family.router.logits_index)
                apply_fit(cal, block, LayerFit(p.layer, candidate.weights.get(p.layer, {})))
            return cal.model(batch).logits
        finally:
            restore_weights(cal)


@pytest.mark.parametrize("model_type,trim", [("mixtral", False), ("qwen2_moe", True),
                                             ("gpt_oss", True), ("mixtral", True),
                                             ("deepseek_v3", False)])
def test_written_checkpoint_equals_in_memory_plan(model_type, trim, tmp_path):
    folder, layout, fingerprint, cal = _calibrated(model_type, tmp_path)
    num = layout.moe_layers[0].num_experts
    width_key = layout.family.keys.expert_width[0]
    old_width = int(layout.config[width_key])
    if trim:
        n_drop, width = budget_split(num, old_width, 0.5, layout.top_k())
        assert (num - n_drop) * width <= 0.5 * num * old_width
    else:
        n_drop, width = 2, None
    candidate = measured_plan(cal, fingerprint, n_drop / num, beam=2, compensate=True,
                              protect={}, min_experts=None, width=width)
    assert candidate.plan.num_dropped == n_drop
    checkpoint = Checkpoint(folder)
    if trim:
        assert all(len(c) == width for layer in candidate.neurons.values()
                   for c in layer.values())
        modified = trimmed_tensors(checkpoint, layout, candidate.plan, candidate.neurons,
                                   candidate.weights)
    else:
        assert candidate.weights, "expected at least one refitted layer"
        modified, rows = modified_tensors(checkpoint, layout, candidate.plan,
                                          candidate.weights, candidate.rel_change)
        assert rows and all(r["rel_change"] > 0 for r in rows)
    prune_checkpoint(folder, candidate.plan, tmp_path / "out", modified=modified,
                     expert_width=width)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[width_key] == (width if trim else old_width)
    batch = cal.held[0] if cal.held else cal.fit[0]
    expected = _in_memory_logits(cal, candidate, batch)
    with torch.no_grad():
        got = load_model(tmp_path / "out", "cpu", "float32")(batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
