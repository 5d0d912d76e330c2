"""Pruning surgery on tiny checkpoints of every registry family, checked against independent
computations (not against moekit's own view of the files)."""

from __future__ import annotations

import json

import pytest
import torch
from prune_support import (
    expert_usage,
    randomize_biases,
    reference_pruned,
    write_synthetic_stats,
)
from tiny_models import TINY_MOE, VOCAB
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.families.registry import first_value, resolve

NUM_EXPERTS = 32

# Families whose logits are unchanged on tokens that never routed to a removed expert.
EXACT = {
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text", "olmoe",
    "hunyuan_v1_moe", "gpt_oss", "granitemoe", "llama4_text", "deepseek_v3", "glm4_moe",
    "minimax_m2",
}
NOT_EXACT = {"deepseek_v2", "phimoe", "ernie4_5_moe"}


def _setup(model_type: str, tiny_checkpoint, tmp_path):
    """A 32-expert tiny checkpoint with random selection biases, its original model, a batch
    and the routing usage of that batch per MoE layer."""
    family = resolve(TINY_MOE[model_type] | {"model_type": model_type}).family
    key = next(k for k in family.keys.num_experts if k in TINY_MOE[model_type])
    overrides = {key: NUM_EXPERTS}
    if model_type == "olmoe":
        overrides["norm_topk_prob"] = True  # OLMoE's default (False) does not renormalise
    folder = randomize_biases(tiny_checkpoint(model_type, **overrides), tmp_path / "src")
    original = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(1))
    usage = expert_usage(original, family, ids)
    return family, folder, original, ids, usage


def _drop_budget(usage: dict, config: dict, family) -> int:
    """Experts per layer that can be removed while removing only unused ones (equally many per
    routing group for grouped routers)."""
    groups = 1
    if family.router.grouped and config.get("topk_method") != "greedy":
        groups = int(first_value(config, family.keys.n_group, 1) or 1)
    size = NUM_EXPERTS // groups
    free = min(sum(1 for j in range(g * size, (g + 1) * size) if counts[j] == 0)
               for counts in usage.values() for g in range(groups))
    return min(free, size // 4) * groups


@pytest.mark.parametrize("model_type", sorted(TINY_MOE))
def test_pruned_checkpoint_loads_and_matches(model_type, tiny_checkpoint, tmp_path):
    """The pruned checkpoint loads cleanly, has the new expert count, equals an independent
    in-memory pruning of the original model (every family), and equals the *original* model on
    all positions when no token of the batch routed to a removed expert (so no causal prefix
    did either) -- for the families in EXACT:

    - softmax -> top-k -> renormalise (mixtral, qwen2/3-moe, qwen3-next, qwen3.5-moe, hunyuan,
      olmoe with norm_topk_prob=True): the kept experts' softmax values all shrink by the same
      factor, so the choice and the renormalised weights are unchanged;
    - top-k on logits first (gpt-oss, granite, llama4): routing reads only the chosen logits;
    - sigmoid per expert + selection bias + renorm (deepseek-v3, glm4-moe, minimax-m2): scores
      are independent of the other experts. DeepSeek-V3's groups (n_group=2, topk_group=1,
      k=2) are scored by their top-2, which are the chosen experts in the winning group, so
      removing unchosen experts can only lower the other groups' scores.

    Not exact (NOT_EXACT): deepseek-v2 (softmax weights without renormalisation change when the
    denominator loses experts), phimoe (sparsemixer's masked softmax reads the neighbours'
    logits), ernie-4.5 (selection on softmax + bias: rescaling the probabilities changes their
    order against the bias)."""
    family, folder, original, ids, usage = _setup(model_type, tiny_checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    n_drop = _drop_budget(usage, config, family)
    assert n_drop > 0, f"the batch uses too many experts: {usage}"
    stats = write_synthetic_stats(tmp_path / "stats", folder, {
        layer: [float(counts[j]) for j in range(NUM_EXPERTS)] for layer, counts in usage.items()})
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prune", str(folder), "--stats", str(stats), "--ratio",
                                      str(n_drop / NUM_EXPERTS), "--criterion", "frequency",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "moekit_provenance.json").read_text())
    kept = {p["layer"]: p["kept"] for p in record["layers"]}
    for p in record["layers"]:
        assert len(p["dropped"]) == n_drop
        assert all(usage[p["layer"]][j] == 0 for j in p["dropped"])

    pruned, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    new_config = json.loads((out / "config.json").read_text())
    for alias in family.keys.num_experts:
        if alias in config:
            assert new_config[alias] == NUM_EXPERTS - n_drop
    reference = reference_pruned(original, AutoConfig.from_pretrained(out), family, kept,
                                 NUM_EXPERTS)
    with torch.no_grad():
        got = pruned.eval()(input_ids=ids).logits
        want = reference(input_ids=ids).logits
        base = original(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if model_type in EXACT:
        torch.testing.assert_close(got, base, atol=1e-5, rtol=1e-5)


def test_exact_lists_cover_registry():
    assert EXACT | NOT_EXACT == set(TINY_MOE) and not EXACT & NOT_EXACT
