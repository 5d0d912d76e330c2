"""Ablation importance (`moekit profile --ablation`): the exact loss/KL change of removing one
expert from one layer agrees with a model whose block was rebuilt by transformers without that
expert, and with `moekit prune --drop` + `moekit eval`; the first-order estimate tracks it;
columns survive save/load/merge; `prune --criterion ablation` ranks by them; bad requests fail
in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ablation_support import nll_and_kl, remove_expert
from tiny_models import build_model, tokenizer
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.ops.ablation.run import ablate
from moekit.stats.profile_io import load_profile, merge_profiles

FAMILIES = {  # model type -> config overrides (every routing trait covered once)
    "mixtral": {},                                 # softmax, renorm, 2 MoE layers in a row
    "deepseek_v3": {},                             # sigmoid + selection bias, groups, scaling
    "gpt_oss": {},                                 # top-k on raw logits first (topk_first)
    "qwen2_moe": {"norm_topk_prob": False},        # softmax without renorm + shared expert
}


def run(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def save_model(model_type: str, out: Path, **overrides) -> Path:
    """A tiny checkpoint; selection biases (DeepSeek-V3) drawn at random so they matter."""
    model = build_model(model_type, **{**FAMILIES.get(model_type, {}), **overrides})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_exact_ablation_matches_a_rebuilt_model(model_type, tmp_path):
    """Per layer and several experts: summed NLL change and KL equal those of a copy of the
    model whose MoE block transformers rebuilt with E-1 experts (fp32)."""
    path = save_model(model_type, tmp_path / model_type)
    model, layout = load(path), describe(Checkpoint(path))
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    sums = ablate(model, layout, [(0, ids)], ["d"])
    base, _ = nll_and_kl(model, model, ids)
    assert sums.base_loss[0] == pytest.approx(base, rel=1e-6)
    checked = 0
    for layer in sums.layers:
        for expert in (0, 3, 6):
            nll, kl = nll_and_kl(remove_expert(model, layout.family, layer, expert), model, ids)
            assert sums.loss[layer][expert, 0] == pytest.approx(nll - base, rel=1e-3, abs=5e-5)
            assert sums.kl[layer][expert, 0] == pytest.approx(kl, rel=1e-3, abs=5e-5)
            checked += 1
    for layer, lift in sums.group_lift.items():  # grouped routers: the plain top-k part alone
        nll, _ = nll_and_kl(remove_expert(model, layout.family, layer, -1), model, ids)
        assert lift[0] == pytest.approx(nll - base, rel=1e-3, abs=5e-5)
    assert bool(sums.group_lift) == (model_type == "deepseek_v3")
    # the quantities are not trivially small: a wrong expert would be caught
    assert np.abs(np.concatenate([v[:, 0] for v in sums.loss.values()])).max() > 1e-3
    assert checked >= 3


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_first_order_estimate_tracks_the_exact_change(model_type, tmp_path):
    path = save_model(model_type, tmp_path / model_type)
    model, layout = load(path), describe(Checkpoint(path))
    ids = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    sums = ablate(model, layout, [(0, ids)], ["d"])
    exact = np.concatenate([sums.loss[layer][:, 0] for layer in sums.layers])
    estimate = np.concatenate([sums.first_order[layer][:, 0] for layer in sums.layers])
    assert np.corrcoef(exact, estimate)[0, 1] > 0.95
    assert np.abs(estimate - exact).max() < 0.3 * np.abs(exact).max()


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_first_order_is_the_derivative_of_a_partial_removal(model_type, tmp_path):
    """In float64, moving layer l's experts output a small step eps towards its re-routed
    value (an independent hook) changes the summed NLL by eps x the first-order estimate."""
    from moekit.calib.capture import moe_blocks
    from moekit.calib.routing import selection_bias
    from moekit.ops.ablation.variants import layer_routing, reroute

    path = save_model(model_type, tmp_path / model_type)
    model, layout = load(path).double(), describe(Checkpoint(path))
    model.set_experts_implementation("eager")
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    sums = ablate(model, layout, [(0, ids)], ["d"], exact=False)
    block = moe_blocks(model, layout.family)[-1]
    routing, bias, eps = layer_routing(layout, len(sums.layers) - 1), selection_bias(
        block.block), 1e-2
    seen = {}

    def on_router(module, args, output):
        seen["z"] = output[layout.family.router.logits_index]

    def blend(module, args, output):
        ids2, w2 = reroute(seen["z"], routing, bias, seen["expert"])
        moved = module.forward(args[0], ids2, w2.to(output.dtype))
        return output + eps * (moved - output)

    base, _ = nll_and_kl(model, model, ids)
    handles = [block.router.register_forward_hook(on_router),
               block.experts.register_forward_hook(blend)]
    try:
        for expert in (0, 2, 5):
            seen["expert"] = expert
            nll, _ = nll_and_kl(model, model, ids)
            slope = (nll - base) / eps
            estimate = sums.first_order[block.layer][expert, 0]
            assert slope == pytest.approx(estimate, rel=3e-3, abs=1e-6)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("model_type,layers,drop", [
    ("qwen2_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1, 2]}, 0),  # 2 layers after
    ("deepseek_v3", {"num_hidden_layers": 2}, 1),  # the only MoE layer, groups -> plain top-k
])
def test_profile_ablation_matches_prune_drop_and_eval(model_type, layers, drop, tmp_path):
    """`profile --ablation` columns equal `prune --drop L:E` then `eval --ref` on the same
    windows: loss change and KL per domain."""
    model = save_model(model_type, tmp_path / "m", **layers)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(tokenizer().convert_ids_to_tokens(list(range(3, 256))) * 3))
    data = ["--data", f"d={text}", "--seq-len", "32", "--max-tokens", "160", "--device", "cpu",
            "--dtype", "float32"]
    result = run("profile", model, *data, "--no-plots", "--ablation", "--ablation-tokens",
                 "100000", "--ablation-method", "exact", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "p" / "expert_stats.csv")
    for expert in (1, 4):
        pruned, listing = tmp_path / f"pruned{expert}", tmp_path / f"drop{expert}.txt"
        listing.write_text(f"{drop}: {expert}\n")
        result = run("prune", model, "--drop", listing, "--out", pruned)
        assert result.exit_code == 0, result.output
        result = run("eval", pruned, "--ref", model, *data, "--json")
        assert result.exit_code == 0, result.output
        evaluated = json.loads(result.output[result.output.index("{"):])["domains"][0]
        row = rows[(rows.layer == drop) & (rows.expert == expert) & (rows.domain == "d")]
        assert int(row.ablation_tokens.iloc[0]) == evaluated["tokens"]
        change = evaluated["loss"] - evaluated["ref_loss"]
        assert row.ablation_loss.iloc[0] == pytest.approx(change, rel=1e-3, abs=2e-6)
        assert row.ablation_kl.iloc[0] == pytest.approx(evaluated["kl"], rel=1e-3, abs=2e-6)


@pytest.fixture(scope="module")
def ablated(tmp_path_factory, tiny_checkpoint):
    """Two ablated profiles of the tiny Mixtral on the two halves of a sample text."""
    from tiny_models import SAMPLE_DATA

    model = tiny_checkpoint("mixtral")
    folder = tmp_path_factory.mktemp("ablated")
    text = sorted(SAMPLE_DATA.glob("*.txt"))[0]
    outs = []
    for name, span in (("a", "0:0.5"), ("b", "0.5:1")):
        out = folder / name
        result = run("profile", model, "--data", f"{name}={text}", "--data-range", span,
                     "--seq-len", "32", "--max-tokens", "128", "--device", "cpu", "--ablation",
                     "--ablation-method", "both", "--ablation-tokens", "64", "--out", out)
        assert result.exit_code == 0, result.output
        outs.append(out)
    return model, outs


def test_columns_report_plot_and_merge(ablated):
    model, (a, b) = ablated
    one, two = load_profile(a), load_profile(b)
    for profile in (one, two):
        frame = profile.expert_stats
        assert {"ablation_tokens", "ablation_loss", "ablation_kl", "ablation_loss_fo"} <= \
            set(frame.columns)
        assert frame["ablation_loss"].notna().all() and (frame["ablation_kl"] >= 0).all()
    assert (a / "ablation_scatter.png").stat().st_size > 1000
    assert "## Ablation importance" in (a / "report.md").read_text()
    merged = merge_profiles([one, two])
    rows = merged.expert_stats[merged.expert_stats.domain == "a"]
    ref = one.expert_stats[one.expert_stats.domain == "a"]
    assert np.allclose(rows["ablation_loss"].to_numpy(), ref["ablation_loss"].to_numpy())
    # `all`: the token-weighted mean of the two inputs
    pick = [p.expert_stats[p.expert_stats.domain == "all"] for p in (one, two)]
    n = [p["ablation_tokens"].to_numpy() for p in pick]
    want = sum(p["ablation_kl"].to_numpy() * t for p, t in zip(pick, n, strict=True)) / sum(n)
    got = merged.expert_stats[merged.expert_stats.domain == "all"]
    assert np.allclose(got["ablation_kl"].to_numpy(), want)
    assert (got["ablation_tokens"].to_numpy() == sum(n)).all()
    # with an input that was not ablated, the means would cover part of the data: dropped
    two.expert_stats = two.expert_stats.drop(columns=[c for c in two.expert_stats.columns
                                                      if c.startswith("ablation")])
    partial = merge_profiles([one, two])
    assert not any(c.startswith("ablation") for c in partial.expert_stats.columns)
    assert "ablation" not in partial.metadata


def test_prune_criterion_ablation_drops_the_least_important(ablated, tmp_path):
    model, (a, _) = ablated
    plan = tmp_path / "plan.json"
    result = run("prune", model, "--stats", a, "--criterion", "ablation", "--ratio", "0.25",
                 "--dry-run", "--plan-out", plan)
    assert result.exit_code == 0, result.output
    frame = load_profile(a).expert_stats
    for layer in json.loads(plan.read_text())["layers"]:
        rows = frame[(frame.layer == layer["layer"]) & (frame.domain == "all")]
        lowest = rows.sort_values(["ablation_loss", "expert"]).expert.head(2).tolist()
        assert sorted(layer["dropped"]) == sorted(lowest)


def test_prune_criterion_ablation_needs_the_columns(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("mixtral")
    result = run("profile", model, "--seq-len", "32", "--max-tokens", "64", "--device", "cpu",
                 "--no-plots", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    result = run("prune", model, "--stats", tmp_path / "p", "--criterion", "ablation",
                 "--ratio", "0.25", "--dry-run")
    assert result.exit_code == 2
    assert "no ablation columns" in result.output and "--ablation" in result.output
    assert "Traceback" not in result.output


def test_first_order_only_has_no_kl(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("mixtral")
    result = run("profile", model, "--seq-len", "32", "--max-tokens", "64", "--device", "cpu",
                 "--no-plots", "--ablation", "--ablation-method", "first-order",
                 "--ablation-tokens", "32", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "p" / "expert_stats.csv")
    assert frame["ablation_loss"].isna().all() and frame["ablation_loss_fo"].notna().all()
    result = run("prune", model, "--stats", tmp_path / "p", "--criterion", "ablation-kl",
                 "--ratio", "0.25", "--dry-run")
    assert result.exit_code == 2 and "ablation_kl" in result.output


@pytest.mark.parametrize("args,message", [
    (("--ablation-tokens", "1"), "--ablation-tokens must be at least 2"),
    (("--ablation-method", "guess"), "unknown --ablation-method 'guess' (use one of"),
    (("--max-memory", "300KB"), "needs the whole model in memory"),
])
def test_bad_ablation_requests_fail_in_one_line(tiny_checkpoint, tmp_path, args, message):
    result = run("profile", tiny_checkpoint("mixtral"), "--seq-len", "32", "--max-tokens", "64",
                 "--device", "cpu", "--no-plots", "--ablation", *args, "--out", tmp_path / "p")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("model_type", ["phimoe", "llama4_text"])
def test_ablation_refuses_routers_it_cannot_replay(tiny_checkpoint, tmp_path, model_type):
    result = run("profile", tiny_checkpoint(model_type), "--seq-len", "32", "--max-tokens", "64",
                 "--device", "cpu", "--no-plots", "--ablation", "--out", tmp_path / "p")
    assert result.exit_code == 2, result.output
    assert "--ablation" in result.output and "not replayable" in result.output
