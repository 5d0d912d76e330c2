"""`moekit inspect` on tiny checkpoints of every family, checked against independent counts:
numel sums read with `safetensors.safe_open`, and MoE layers / experts / top-k / routed
parameters read from the instantiated transformers model."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from real_checkpoints import write_sparse
from tiny_models import DENSE_TYPES, MOE_TYPES, TINY_MOE, build_model, read_config, unread_embedding
from typer.testing import CliRunner

from moekit.cli.app import app

EXPECTED_FAMILY = {"qwen3_5_moe_text": "qwen3_5_moe", "llama4_text": "llama4",
                   "gemma3_text": "gemma3"}


def inspect_json(folder: Path) -> dict:
    result = CliRunner().invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def file_numel(folder: Path) -> int:
    """Total elements over every tensor of every *.safetensors file, via safe_open."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return total


def model_facts(model) -> dict[int, tuple[int, int, int]]:
    """Decoder-layer index -> (experts E, top-k, routed-expert params) from the model's modules:
    the fused `experts` module gives E (axis 0) and its parameter count, the router beside it
    (the sibling module with a `top_k` attribute) gives k."""
    facts = {}
    for name, module in model.named_modules():
        match = re.fullmatch(r"(.*layers\.(\d+)\..*)\.experts", name)
        if not match or not hasattr(module, "gate_up_proj"):
            continue
        block = model.get_submodule(match[1])
        ks = {m.top_k for n, m in block.named_children() if n != "experts" and hasattr(m, "top_k")}
        assert len(ks) == 1, f"{name}: routers disagree on top-k {ks}"
        routed = sum(p.numel() for p in module.parameters())
        facts[int(match[2])] = (module.gate_up_proj.shape[0], ks.pop(), routed)
    return facts


def expected_active(total: int, facts: dict[int, tuple[int, int, int]]) -> float:
    """All parameters minus, per MoE layer, the routed parameters a token skips: R * (1 - k/E)."""
    return total - sum(routed * (1 - k / e) for e, k, routed in facts.values())


def check_against_model(report: dict, folder: Path, model) -> None:
    facts = model_facts(model)
    total = file_numel(folder)
    assert report["total_params"] == total
    assert total == sum(v.numel() for v in model.state_dict().values())
    assert report["moe_layers"] == sorted(facts)
    assert report["experts_per_layer"] == [facts[i][0] for i in sorted(facts)]
    assert report["top_k"] == facts[min(facts)][1]
    assert report["routed_expert_params"] == sum(f[2] for f in facts.values())
    assert abs(report["active_params"] - expected_active(total, facts)) <= 1
    assert report["active_params_no_embedding"] == \
        report["active_params"] - unread_embedding(folder)
    assert report["active_params"] < total


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_inspect_every_moe_family(model_type, tiny_checkpoint):
    folder = tiny_checkpoint(model_type)
    report = inspect_json(folder)
    assert report["family"] == EXPECTED_FAMILY.get(model_type, model_type)
    assert report["is_moe"] is True
    assert report["num_layers"] == read_config(folder)["num_hidden_layers"]
    assert report["num_shards"] == 1
    assert report["bytes_on_disk"] == (folder / "model.safetensors").stat().st_size
    check_against_model(report, folder, build_model(model_type))


# (model_type, config overrides, MoE layers the config implies, written out by hand)
PLACEMENTS = [
    ("deepseek_v2", dict(num_hidden_layers=4, first_k_dense_replace=2), [2, 3]),
    ("deepseek_v3", dict(num_hidden_layers=4, first_k_dense_replace=3), [3]),
    ("glm4_moe", dict(num_hidden_layers=4, first_k_dense_replace=2), [2, 3]),
    ("ernie4_5_moe", dict(num_hidden_layers=4, moe_layer_start_index=1, moe_layer_interval=2),
     [1, 3]),
    ("ernie4_5_moe", dict(num_hidden_layers=4, moe_layer_start_index=2), [2, 3]),
    ("qwen2_moe", dict(num_hidden_layers=4, decoder_sparse_step=2), [1, 3]),
    ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[1]), [0, 2]),
    ("llama4_text", dict(num_hidden_layers=4, interleave_moe_layer_step=2), [1, 3]),
]


@pytest.mark.parametrize(("model_type", "overrides", "expected"), PLACEMENTS,
                         ids=[f"{p[0]}-{p[2]}" for p in PLACEMENTS])
def test_moe_layer_placement(model_type, overrides, expected, tiny_checkpoint):
    folder = tiny_checkpoint(model_type, **overrides)
    report = inspect_json(folder)
    model = build_model(model_type, **overrides)
    assert sorted(model_facts(model)) == expected
    assert report["moe_layers"] == expected
    check_against_model(report, folder, model)


@pytest.mark.parametrize("model_type", DENSE_TYPES)
def test_inspect_dense_family(model_type, tiny_checkpoint):
    folder = tiny_checkpoint(model_type)
    report = inspect_json(folder)
    assert report["family"] == EXPECTED_FAMILY.get(model_type, model_type)
    assert report["is_moe"] is False and report["moe_layers"] == [] and report["top_k"] is None
    assert report["total_params"] == report["active_params"] == file_numel(folder)
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0 and "dense" in result.stdout


def test_inspect_table_and_export(tiny_checkpoint, tmp_path):
    import pandas as pd

    folder = tiny_checkpoint("deepseek_v3")
    result = CliRunner().invoke(app, ["inspect", str(folder), "--export",
                                      str(tmp_path / "facts.csv")])
    assert result.exit_code == 0, result.output
    assert "deepseek_v3" in result.stdout and "sigmoid" in result.stdout
    assert "x 2.5" in result.stdout  # routed_scaling_factor read from the config
    row = pd.read_csv(tmp_path / "facts.csv").iloc[0]
    assert row["total_params"] == file_numel(folder)
    assert json.loads(row["moe_layers"]) == [1, 2]


def test_kimi_k2_config_reads_as_deepseek_v3(tiny_checkpoint, tmp_path):
    folder = tmp_path / "kimi"
    shutil.copytree(tiny_checkpoint("deepseek_v3"), folder)
    config = read_config(folder)
    config["model_type"] = "kimi_k2"
    (folder / "config.json").write_text(json.dumps(config))
    report = inspect_json(folder)
    assert report["family"] == "deepseek_v3" and report["moe_layers"] == [1, 2]


def test_deepseek_v2_greedy_is_not_reported_grouped(tiny_checkpoint, tmp_path):
    folder = tmp_path / "greedy"
    shutil.copytree(tiny_checkpoint("deepseek_v2"), folder)
    assert "grouped top-k" in inspect_json(folder)["router_scoring"]
    config = read_config(folder)
    config["topk_method"] = "greedy"
    (folder / "config.json").write_text(json.dumps(config))
    assert "grouped" not in inspect_json(folder)["router_scoring"]


def test_per_layer_config_lists(tiny_checkpoint, tmp_path):
    """Hunyuan configs on the Hub give moe_topk / num_shared_expert / widths per layer."""
    folder = tmp_path / "hunyuan"
    shutil.copytree(tiny_checkpoint("hunyuan_v1_moe"), folder)
    config = read_config(folder)
    config.update(moe_topk=[2, 2], num_shared_expert=[1, 1], moe_intermediate_size=[32, 32])
    (folder / "config.json").write_text(json.dumps(config))
    report = inspect_json(folder)
    assert (report["top_k"], report["shared_experts"], report["expert_width"]) == (2, 1, 32)


def test_vlm_wrapper_with_nested_text_config(tmp_path):
    """Qwen3.5-MoE as shipped: model_type qwen3_5_moe, text_config, model.language_model.*"""
    from transformers import AutoConfig, AutoModelForImageTextToText

    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=4, spatial_merge_size=1, temporal_patch_size=1)
    config = AutoConfig.for_model("qwen3_5_moe", text_config=TINY_MOE["qwen3_5_moe_text"],
                                  vision_config=vision)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.save_pretrained(tmp_path)
    report = inspect_json(tmp_path)
    assert report["family"] == "qwen3_5_moe" and report["model_type"] == "qwen3_5_moe_text"
    check_against_model(report, tmp_path, model)


def test_per_expert_family_stored_fused(tmp_path):
    """A per-expert family saved in transformers' fused layout (`experts.gate_up_proj`)."""
    model = build_model("qwen3_5_moe_text")
    model.save_pretrained(tmp_path, save_original_format=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert "model.layers.0.mlp.experts.gate_up_proj" in handle.keys()
    report = inspect_json(tmp_path)
    assert report["expert_layout"] == "fused"
    check_against_model(report, tmp_path, model)


def test_trained_mixtral_counts(trained_checkpoint):
    folder = trained_checkpoint("moe")
    report = inspect_json(folder)
    assert report["family"] == "mixtral"
    assert report["moe_layers"] == [0, 1]
    assert report["experts_per_layer"] == [8] * 2 and report["top_k"] == 2
    total = file_numel(folder)
    assert report["total_params"] == total
    # 2 layers x 8 experts x 3 matrices of hidden x intermediate; a token uses 2 of 8.
    config = read_config(folder)
    routed = 2 * 8 * 3 * config["hidden_size"] * config["intermediate_size"]
    assert report["routed_expert_params"] == routed
    assert report["active_params"] == total - round(routed * (1 - 2 / 8))


def write_sparse_checkpoint(folder: Path, hidden: int = 4096, inter: int = 14336,
                            layers: int = 2, experts: int = 8) -> tuple[Path, int]:
    """A Mixtral-shaped safetensors file: a valid header, then holes where the data would be."""
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [32000, hidden],
                                    "lm_head.weight": [32000, hidden]}
    for i in range(layers):
        shapes[f"model.layers.{i}.block_sparse_moe.gate.weight"] = [experts, hidden]
        for j in range(experts):
            base = f"model.layers.{i}.block_sparse_moe.experts.{j}"
            shapes[f"{base}.w1.weight"] = [inter, hidden]
            shapes[f"{base}.w3.weight"] = [inter, hidden]
            shapes[f"{base}.w2.weight"] = [hidden, inter]
    path = folder / "model.safetensors"
    numel = write_sparse(path, {name: ("BF16", shape) for name, shape in shapes.items()})
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
              "num_hidden_layers": layers, "num_local_experts": experts,
              "num_experts_per_tok": 2, "intermediate_size": inter, "hidden_size": hidden}
    (folder / "config.json").write_text(json.dumps(config))
    return path, numel


def bytes_read() -> int | None:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return int(re.search(r"^rchar: (\d+)", text, re.M)[1])


def test_inspect_reads_headers_only(tmp_path, monkeypatch):
    import safetensors

    path, numel = write_sparse_checkpoint(tmp_path)
    size = path.stat().st_size
    assert size > 5 * 10**9
    if path.stat().st_blocks * 512 > 1 << 20:
        pytest.skip("this filesystem does not keep sparse files sparse")

    def no_mmap(*args, **kwargs):
        raise AssertionError("inspect must not open tensors")

    monkeypatch.setattr(safetensors, "safe_open", no_mmap)
    before = bytes_read()
    report = inspect_json(tmp_path)
    if before is not None:
        assert bytes_read() - before < 64 << 20
    assert report["total_params"] == numel and report["bytes_on_disk"] == size
    assert report["moe_layers"] == [0, 1] and report["experts_per_layer"] == [8, 8]
    routed = 2 * 8 * 3 * 4096 * 14336
    assert report["active_params"] == numel - round(routed * 6 / 8)
    # the sparse file has an untied lm_head: a token reads one of the 32000 embedding rows
    assert report["active_params_no_embedding"] == report["active_params"] - 31999 * 4096
    # Reading the holes would not allocate blocks, but writing would; the data was never
    # touched either way: the file still holds only its header.
    assert path.stat().st_blocks * 512 <= 1 << 20
    assert path.stat().st_size == size
