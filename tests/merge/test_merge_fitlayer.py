"""`merge --method fit-layer` (whole-layer, sequential refit of the merged experts) against
independent computations:
- the refit lowers the error of every decoder layer's output (vs the unmerged model) on tokens
  it never saw, against the same merge without the refit (the model pruned to the centres,
  written by `prune`), end to end through transformers;
- only down projections change: every merged expert's gate/up is its centre's, byte for byte,
  and every written down projection is either the centre's or the refit's;
- fused layouts (gpt-oss with biases, Qwen3-MoE, DeepSeek-V3 with groups and a shared expert)
  load with the new expert count; other router policies are refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import merge, stats_for
from tiny_models import read_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from moekit.families.layout import describe
from moekit.io.reader import Checkpoint


def corpus(tmp_path: Path) -> Path:
    """Varied pseudo-text; calibration uses its first half, the checks its second half."""
    gen = torch.Generator().manual_seed(3)
    words = ["def", "return", "item", "value", "for", "in", "print", "the", "data", "x", "+",
             "(", ")", ":", "list", "name", "self", "if", "else", "None"]
    picks = torch.randint(0, len(words), (8000,), generator=gen).tolist()
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(words[i] for i in picks))
    return text


def fit_layer_merge(source: Path, tmp_path: Path, *extra: object) -> tuple[Path, dict]:
    out, plan = tmp_path / "merged", tmp_path / "plan.json"
    result = merge(source, "--stats", stats_for(tmp_path, source), "--ratio", "0.5",
                   "--method", "fit-layer", "--data", f"c={corpus(tmp_path)}", "--data-range",
                   "0:0.5", "--max-tokens", "1024", "--seq-len", "64", "--plan-out", plan,
                   "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return out, json.loads(plan.read_text())


def layer_errors(reference: Path, other: Path, ids: torch.Tensor) -> list[float]:
    """sum ||h_l - h_l^ref||^2 over the held-out positions, for every hidden state l >= 1."""
    states = []
    for folder in (reference, other):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[1:])
    return [float((a - b).pow(2).sum()) for a, b in zip(*states, strict=True)]


def test_refit_lowers_unseen_layer_errors_against_the_unrefitted_merge(tiny_checkpoint,
                                                                       tmp_path):
    from moekit.ops.merge.plan import MergePlan
    from moekit.ops.prune import prune_checkpoint

    source = tiny_checkpoint("mixtral")
    out, plan = fit_layer_merge(source, tmp_path)
    centres_only = tmp_path / "centres"
    prune_checkpoint(source, MergePlan.from_dict(plan).as_prune_plan(), centres_only)
    tok = AutoTokenizer.from_pretrained(source)
    text = (tmp_path / "corpus.txt").read_text()
    ids = torch.tensor(tok(text[len(text) // 2:])["input_ids"][:512]).reshape(8, 64)
    refit = layer_errors(source, out, ids)
    plain = layer_errors(source, centres_only, ids)
    record = json.loads((out / "moekit_provenance.json").read_text())
    layers = {str(p["layer"]) for p in plan["layers"]}
    assert set(record["calibration"]["refit"]["layers"]) == layers
    assert all(a < 0.95 * b for a, b in zip(refit, plain, strict=True)), (refit, plain)


def test_only_down_projections_change(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral")
    out, plan = fit_layer_merge(source, tmp_path)
    before, after = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    record = json.loads((out / "moekit_provenance.json").read_text())
    refit = record["calibration"]["refit"]["layers"]
    changed = 0
    for p in plan["layers"]:
        base = f"model.layers.{p['layer']}.block_sparse_moe."
        centres = [c[0] for c in p["clusters"]]
        assert torch.equal(after[base + "gate.weight"], before[base + "gate.weight"][centres])
        for new, cluster in enumerate(p["clusters"]):
            old = f"{base}experts.{cluster[0]}."
            now = f"{base}experts.{new}."
            for w in ("w1", "w3"):
                assert torch.equal(after[now + w + ".weight"], before[old + w + ".weight"])
            same = torch.equal(after[now + "w2.weight"], before[old + "w2.weight"])
            assert same == (cluster[0] not in refit[str(p["layer"])]["refitted"])
            changed += not same
        assert not any(k.startswith(f"{base}experts.{len(p['clusters'])}.") for k in after)
    assert changed > 0


@pytest.mark.parametrize("model_type", ["gpt_oss", "qwen3_moe", "deepseek_v3"])
def test_fused_families_load_with_the_new_expert_count(model_type, tiny_checkpoint, tmp_path):
    from moekit.families.registry import first_value

    source = tiny_checkpoint(model_type)
    out, _ = fit_layer_merge(source, tmp_path)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    config = read_config(out)
    layout = describe(Checkpoint(source))
    assert first_value(config, layout.family.keys.num_experts) == 4
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 9, 11, 40]])).logits).all()


def test_other_router_policies_are_refused(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral")
    out = tmp_path / "out"
    result = merge(source, "--stats", stats_for(tmp_path, source), "--ratio", "0.5", "--method",
                   "fit-layer", "--router", "usage", "--out", out)
    assert result.exit_code == 2, result.output
    assert "--router centre" in result.output and not out.exists()


def test_fixed_centres_are_kept_without_a_search():
    """merge's refit keeps the plan's centres as given (`measure_layer(kept=...)`): the removal
    set is their complement, scored by D(kept) once; a wrong count or a repeated id is refused."""
    from moekit.layerfit.measured import fixed_drop

    calls = []

    class Replay:
        def error(self, keep):
            calls.append(list(keep))
            return float(sum(keep))

    found = fixed_drop(Replay(), 6, 2, [5, 0, 3, 1])
    assert found.dropped == (2, 4) and found.error == 9.0 and found.single == ()
    assert calls == [[0, 1, 3, 5]]  # one evaluation, no search
    for bad in ([0, 1, 3], [0, 1, 1, 3], [0, 1, 3, 6]):
        with pytest.raises(ValueError):
            fixed_drop(Replay(), 6, 2, bad)


def test_refit_scores_the_router_the_merge_writes(tiny_checkpoint, tmp_path, monkeypatch):
    """The merge writes its centres' original router rows, so its layered refit must not refit
    the router for the lanes it scores (it did: `Search`'s default router refit was on)."""
    from moekit.layerfit import measured

    def refuse(*args, **kwargs):
        raise AssertionError("merge's refit refitted the router rows it does not write")

    monkeypatch.setattr(measured, "refit_router", refuse)
    out, plan = fit_layer_merge(tiny_checkpoint("mixtral"), tmp_path)
    assert (out / "config.json").exists() and plan["layers"]
