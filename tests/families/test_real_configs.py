"""inspect on header-only checkpoints with the real models' configs and Hub tensor layouts
(tests/real_checkpoints.py) gives the parameter counts their authors publish; DeepSeek-V3's
multi-token-prediction layer is counted apart and dropped, with the config, by prune."""

from __future__ import annotations

import json
import math

import pytest
from real_checkpoints import write_real
from safetensors.torch import load_file
from support import with_mtp_layer
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.ops.inspect import inspect_checkpoint

# name: (the count the authors' "active" number matches, its tolerance, the total's tolerance).
# Mistral, Qwen3-MoE, OLMoE, Phi and DeepSeek count the whole embedding table as active
# (`active_params`); OpenAI and Meta count one row of it (`active_params_no_embedding`;
# gpt-oss-20b: 4.19 B with the table, 3.61 B without); GLM, IBM and Qwen3-Next count neither
# the embedding table nor the output head (`no_tables`: active minus both). DeepSeek's "37B
# activated" is rounded from 37.55 B (1.5 %); "3.3B" (Qwen3-30B-A3B: 3.35 B) and "1.3B" (OLMoE:
# 1.28 B) are rounded to two digits, hence 2 %; Kimi-K2's card rounds to "1T" / "32B"
# (1.026 T / 32.86 B here, 3 %); GLM-4.5-Air's "12B" is 12.18 B (2 %); Qwen3-Next's "3B" is the
# rounded model name (A3B): 3.25 B without the tables (9 %), 3.87 B with them.
CATALOGUE = {
    "gpt-oss-20b": ("active_params_no_embedding", 0.01, 0.01),
    "gpt-oss-120b": ("active_params_no_embedding", 0.01, 0.01),
    "deepseek-v3": ("active_params", 0.015, 0.01),
    "kimi-k2": ("active_params", 0.03, 0.03),
    "glm-4.5-air": ("no_tables", 0.02, 0.01),
    "llama-4-scout-17b-16e": ("active_params_no_embedding", 0.01, 0.01),
    "qwen3-next-80b-a3b": ("no_tables", 0.09, 0.01),
    "mixtral-8x7b": ("active_params", 0.01, 0.01),
    "qwen3-30b-a3b": ("active_params", 0.02, 0.01),
    "qwen3-235b-a22b": ("active_params", 0.01, 0.01),
    "olmoe-1b-7b": ("active_params", 0.02, 0.01),
    "phi-3.5-moe": ("active_params", 0.01, 0.01),
    "granite-3.1-3b-a800m": ("no_tables", 0.02, 0.01),
}


def _active(report, field: str, folder) -> float:
    """The active count as the authors count it (see CATALOGUE)."""
    if field != "no_tables":
        return getattr(report, field)
    tensors = Checkpoint(folder).tensors
    tables = [k for k in tensors if k.endswith(("embed_tokens.weight", "lm_head.weight"))
              and not k.startswith(("mtp.", *(f"model.layers.{i}." for i in report.mtp_layers)))]
    return report.active_params - sum(math.prod(tensors[k].shape) for k in tables)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_inspect_matches_published_counts(name, tmp_path):
    folder, published = write_real(name, tmp_path / name)
    path = folder / "model.safetensors"
    with path.open("rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
    if path.stat().st_blocks * 512 > header + (1 << 24):  # Kimi-K2's header alone is ~20 MB
        pytest.skip("this filesystem does not keep sparse files sparse")
    report = inspect_checkpoint(folder)
    field, tolerance, total_tolerance = CATALOGUE[name]
    assert report.total_params == pytest.approx(published["total"], rel=total_tolerance)
    assert _active(report, field, folder) == pytest.approx(published["active"], rel=tolerance)
    assert bool(report.mtp_layers) == ("mtp" in published)
    if "mtp" in published:
        assert report.mtp_params == pytest.approx(published["mtp"], rel=0.05)
    if name == "deepseek-v3":
        assert report.mtp_layers == [61]
        assert 61 not in report.moe_layers and len(report.moe_layers) == 58
    if name == "qwen3-next-80b-a3b":  # its MTP block lies under mtp., apart from the 48 layers
        assert report.mtp_layers == [0] and len(report.moe_layers) == 48
    quantization = json.loads((folder / "config.json").read_text()).get("quantization_config")
    assert report.quant_method == (quantization or {}).get("quant_method")


@pytest.fixture()
def with_mtp(tiny_checkpoint, tmp_path):
    """A tiny DeepSeek-V3 (3 layers) with an MTP block stored as layer 3, as the Hub does."""
    folder = with_mtp_layer(tiny_checkpoint("deepseek_v3"), tmp_path / "with-mtp")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return folder


def test_mtp_layer_is_apart_and_dropped_by_prune(with_mtp, tmp_path, sample_texts):
    layout = describe(Checkpoint(with_mtp))
    assert [m.index for m in layout.mtp_layers] == [3]
    assert [m.index for m in layout.moe_layers] == [1, 2]
    runner = CliRunner()
    text = next(iter(sample_texts.values()))
    stats = tmp_path / "prof"
    result = runner.invoke(app, ["profile", str(with_mtp), "--data", f"d={text}",
                                 "--max-tokens", "2048", "--seq-len", "64", "--out", str(stats)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(with_mtp), "--stats", str(stats), "--ratio", "0.25",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    pruned = load_file(out / "model.safetensors")
    assert not any(k.startswith("model.layers.3.") for k in pruned)
    assert any(k.startswith("model.layers.2.mlp.experts.5.") for k in pruned)
    assert not any(k.startswith("model.layers.2.mlp.experts.6.") for k in pruned)
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["n_routed_experts"] == 6
    provenance = json.loads((out / "moekit_provenance.json").read_text())
    assert any("multi-token-prediction" in w for w in provenance["warnings"])
    assert sorted(int(layer["layer"]) for layer in provenance["layers"]) == [1, 2]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads: config and tensors agree


@pytest.fixture()
def next_with_mtp(tiny_checkpoint, tmp_path):
    """A tiny Qwen3-Next with its MTP block under `mtp.` as the Hub stores it: one MoE decoder
    layer `mtp.layers.0.*` (here a copy of layer 3) with `mtp.fc`, `mtp.norm` and the two
    pre-fc norms; `mtp_num_hidden_layers: 1` in config.json."""
    import shutil

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "next-mtp"
    shutil.copytree(tiny_checkpoint("qwen3_next"), folder)
    weights = load_file(folder / "model.safetensors")
    hidden = weights["model.norm.weight"].shape[0]
    mtp = {k.replace("model.layers.3.", "mtp.layers.0."): v.clone() for k, v in weights.items()
           if k.startswith("model.layers.3.")}
    mtp.update({"mtp.fc.weight": torch.zeros(hidden, 2 * hidden),
                **{f"mtp.{n}.weight": torch.ones(hidden)
                   for n in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden")}})
    save_file({**weights, **mtp}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))
    return folder


@pytest.mark.parametrize("command", ["prune", "merge"])
def test_qwen3_next_mtp_block_is_apart_and_dropped_whole(command, next_with_mtp, tmp_path):
    layout = describe(Checkpoint(next_with_mtp))
    assert [m.prefix for m in layout.mtp_layers] == ["mtp.layers.0."]
    assert [m.index for m in layout.moe_layers] == [0, 1, 2, 3]
    assert inspect_checkpoint(next_with_mtp).mtp_params > 0
    out = tmp_path / "out"
    extra = ["--group", "weight", "--method", "average"] if command == "merge" else []
    result = CliRunner().invoke(app, [command, str(next_with_mtp), "--criterion", "random",
                                      "--ratio", "0.25", *extra, "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = load_file(out / "model.safetensors")
    assert not any(k.startswith("mtp.") for k in written)
    assert any(k.startswith("model.layers.3.mlp.experts.") for k in written)
    config = json.loads((out / "config.json").read_text())
    assert config["mtp_num_hidden_layers"] == 0
    provenance = json.loads((out / "moekit_provenance.json").read_text())
    assert any("multi-token-prediction layer(s) mtp.layers.0" in w
               for w in provenance["warnings"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads: config and tensors agree


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_prune_dry_run_plans_every_catalogue_model(name, tmp_path):
    """`prune --dry-run` plans the real layouts from headers and router rows alone: every MoE
    layer (never an MTP layer) loses the same number of its experts, the rest are kept."""
    folder, _ = write_real(name, tmp_path / name)
    report = inspect_checkpoint(folder)
    result = CliRunner().invoke(app, ["prune", str(folder), "--ratio", "0.25", "--criterion",
                                      "random", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert [p["layer"] for p in plan["layers"]] == report.moe_layers  # inspect: MTP apart
    experts = describe(Checkpoint(folder)).moe_layers[0].num_experts
    dropped = {len(p["dropped"]) for p in plan["layers"]}
    assert dropped == {round(0.25 * experts)}
    assert all(sorted(p["kept"] + p["dropped"]) == list(range(p["num_experts"]))
               for p in plan["layers"])
