"""`moekit upcycle`: function preservation against the dense model, loadability, parameter
counts, drop/split tensor contents, routing balance of the data router, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from moekit.cli.app import app

PAIRS = [("llama", "mixtral", "MixtralForCausalLM"),
         ("mistral", "mixtral", "MixtralForCausalLM"),
         ("qwen2", "qwen2_moe", "Qwen2MoeForCausalLM"),
         ("qwen3", "qwen3_moe", "Qwen3MoeForCausalLM")]
H, WIDTH, LAYERS = 64, 64, 2  # tiny dense sizes (tests/tiny_models.py)
IDS = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
runner = CliRunner()


def run(*args: str):  # noqa: ANN201
    result = runner.invoke(app, ["upcycle", *args])
    return result


def upcycle_ok(*args: str) -> None:
    result = run(*args)
    assert result.exit_code == 0, result.output


def load(folder: Path, expected_class: str | None = None):  # noqa: ANN201
    """Load with transformers in float32; no missing/unexpected/mismatched keys allowed."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    if expected_class:
        assert type(model).__name__ == expected_class
    return model.eval()


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:  # noqa: ANN001
    with torch.inference_mode():
        return model(input_ids=ids).logits


def max_diff(dense: Path, moe: Path, expected_class: str, ids: torch.Tensor = IDS) -> float:
    return float((logits(load(dense), ids) - logits(load(moe, expected_class), ids)).abs().max())


def numel(folder: Path) -> int:
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            total += sum(int(torch.tensor(handle.get_slice(k).get_shape()).prod())
                         for k in handle.keys())
    return total


def inspect_json(folder: Path) -> dict:
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# --- function preservation ---------------------------------------------------------------------

@pytest.mark.parametrize(("source", "target", "cls"), PAIRS)
def test_copy_is_the_dense_model(tiny_checkpoint, tmp_path, source, target, cls):
    dense = tiny_checkpoint(source)
    out = tmp_path / "moe"
    upcycle_ok(str(dense), "--arch", target, "-e", "4", "-k", "2", "--method", "copy",
               "-o", str(out))
    assert max_diff(dense, out, cls) < 1e-5
    # inspect counts the parameters we expect, computed from the dense tensors
    dense_total = numel(dense)
    extra_per_layer = 4 * 3 * H * WIDTH - 3 * H * WIDTH + 4 * H  # experts - dense FFN + router
    if target == "qwen2_moe":
        extra_per_layer += H  # the zero-width shared expert still has its [1, H] gate
    report = inspect_json(out)
    assert report["total_params"] == dense_total + LAYERS * extra_per_layer
    assert report["active_params"] == report["total_params"] - LAYERS * 2 * 3 * H * WIDTH
    assert report["top_k"] == 2 and report["experts_per_layer"] == [4] * LAYERS


@pytest.mark.parametrize(("source", "target", "cls"), PAIRS)
@pytest.mark.parametrize("order", ["contiguous", "random"])
def test_split_with_zero_router_and_all_experts_is_the_dense_model(
        tiny_checkpoint, tmp_path, source, target, cls, order):
    dense = tiny_checkpoint(source)
    out = tmp_path / "moe"
    upcycle_ok(str(dense), "--arch", target, "-e", "4", "-k", "4", "--method", "split",
               "--router", "zero", "--split-order", order, "-o", str(out))
    assert max_diff(dense, out, cls) < 1e-5
    assert json.loads((out / "config.json").read_text())[
        "intermediate_size" if target == "mixtral" else "moe_intermediate_size"] == WIDTH // 4


def test_qwen2_shared_expert_copy_and_split(tiny_checkpoint, tmp_path):
    dense = tiny_checkpoint("qwen2")
    copy, split = tmp_path / "copy", tmp_path / "split"
    upcycle_ok(str(dense), "-e", "4", "-k", "1", "--shared-expert", "-o", str(copy))
    upcycle_ok(str(dense), "-e", "4", "-k", "4", "--method", "split", "--shared-neurons", "16",
               "--router", "zero", "-o", str(split))
    assert max_diff(dense, copy, "Qwen2MoeForCausalLM") < 1e-5
    assert max_diff(dense, split, "Qwen2MoeForCausalLM") < 1e-5
    config = json.loads((split / "config.json").read_text())
    assert (config["shared_expert_intermediate_size"], config["moe_intermediate_size"]) == (16, 12)
    with safe_open(str(split / "model.safetensors"), "pt") as handle:
        assert not handle.get_tensor("model.layers.0.mlp.shared_expert_gate.weight").any()


def test_copy_without_renorm_needs_zero_router(tiny_checkpoint, tmp_path):
    dense = tiny_checkpoint("qwen3")
    zero, rand = tmp_path / "zero", tmp_path / "rand"
    for out, router in ((zero, "zero"), (rand, "random")):
        upcycle_ok(str(dense), "-e", "4", "-k", "2", "--no-norm-topk-prob", "--router", router,
                   "--router-std", "1.0", "-o", str(out))
    assert max_diff(dense, zero, "Qwen3MoeForCausalLM") < 1e-5
    assert max_diff(dense, rand, "Qwen3MoeForCausalLM") > 1e-3  # the test can fail


def test_qwen3_trained_copy_and_split(trained_checkpoint, tmp_path):
    dense = trained_checkpoint("dense")
    ids = torch.randint(1, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    copy, split = tmp_path / "copy", tmp_path / "split"
    upcycle_ok(str(dense), "-e", "8", "-k", "2", "-o", str(copy))
    upcycle_ok(str(dense), "-e", "8", "-k", "8", "--method", "split", "--router", "zero",
               "--split-order", "random", "-o", str(split))
    assert max_diff(dense, copy, "Qwen3MoeForCausalLM", ids) < 1e-4
    assert max_diff(dense, split, "Qwen3MoeForCausalLM", ids) < 1e-4


# --- tensor contents ---------------------------------------------------------------------------

def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors


def test_split_experts_hold_the_mapped_neurons(tiny_checkpoint, tmp_path):
    dense = read_all(tiny_checkpoint("llama"))
    out = tmp_path / "moe"
    upcycle_ok(str(tiny_checkpoint("llama")), "-e", "4", "-k", "2", "--method", "split",
               "--split-order", "random", "--seed", "7", "-o", str(out))
    moe, groups = read_all(out), json.loads((out / "moekit_upcycle_neurons.json").read_text())
    seen = []
    for j, ids in enumerate(groups["1"]["experts"]):
        ids = torch.tensor(ids)
        base = "model.layers.1.block_sparse_moe.experts"
        w1, w2 = moe[f"{base}.{j}.w1.weight"], moe[f"{base}.{j}.w2.weight"]
        assert torch.equal(w1, dense["model.layers.1.mlp.gate_proj.weight"][ids])
        assert torch.equal(w2, 4 * dense["model.layers.1.mlp.down_proj.weight"][:, ids])
        seen += ids.tolist()
    assert sorted(seen) == list(range(WIDTH)) and seen != list(range(WIDTH))  # shuffled


def test_drop_reinitialises_one_neuron_set_per_expert(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama")
    dense = read_all(source)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        upcycle_ok(str(source), "-e", "4", "-k", "2", "--method", "drop", "--drop-ratio",
                   "0.25", "--seed", "3", "-o", str(out))
    first, second = read_all(outs[0]), read_all(outs[1])
    assert all(torch.equal(first[k], second[k]) for k in first)  # seeded
    sets = []
    for j in range(4):
        base = f"model.layers.0.block_sparse_moe.experts.{j}"
        changed = []
        for name, role, axis in (("w1", "gate_proj", 1), ("w3", "up_proj", 1),
                                 ("w2", "down_proj", 0)):
            ref = dense[f"model.layers.0.mlp.{role}.weight"]
            diff = (first[f"{base}.{name}.weight"] != ref).any(dim=axis)
            changed.append(tuple(diff.nonzero().squeeze(1).tolist()))
            new = first[f"{base}.{name}.weight"].index_select(1 - axis, torch.tensor(changed[-1]))
            assert abs(new.std().item() - ref.std().item()) < 0.3 * ref.std().item()
        assert changed[0] == changed[1] == changed[2] and len(changed[0]) == WIDTH // 4
        sets.append(changed[0])
    assert len(set(sets)) == 4
    assert max_diff(source, outs[0], "MixtralForCausalLM") > 1e-4


# --- data router -------------------------------------------------------------------------------

def routing_cv(folder: Path, windows: list[torch.Tensor]) -> float:
    """Mean over layers of std/mean of per-expert top-k token counts (transformers'
    output_router_logits on held-out text)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    with torch.inference_mode():  # one batch: transformers' CPU grouped_mm is slow per call
        out = model(input_ids=torch.stack(windows), output_router_logits=True)
    counts = torch.stack([torch.bincount(r.topk(k, dim=-1).indices.flatten(), minlength=experts)
                          for r in out.router_logits]).float()
    return float((counts.std(dim=1) / counts.mean(dim=1)).mean())


def held_out_windows(folder: Path, texts: list[Path]) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = []
    for path in texts:
        text = path.read_text()
        ids = tokenizer(text[len(text) // 2:], add_special_tokens=False)["input_ids"]
        windows += [torch.tensor(ids[s:s + 256]) for s in range(0, 1024, 256)]
    return windows


def test_data_router_balances_better_than_random(trained_checkpoint, sample_texts, tmp_path,
                                                 capsys):
    dense = trained_checkpoint("dense")
    texts = list(sample_texts.values())
    data = [arg for path in texts for arg in ("--data", str(path))]
    cvs, windows = {}, held_out_windows(dense, texts)
    for router in ("random", "data"):
        out = tmp_path / router
        extra = data + ["--data-range", "0:0.5", "--max-tokens", str(len(texts) * 1024)
                        ] if router == "data" else []  # in total: 1024 from each text
        upcycle_ok(str(dense), "-e", "8", "-k", "2", "--router", router, *extra, "-o", str(out))
        cvs[router] = routing_cv(out, windows)
    with capsys.disabled():
        print(f"\nrouting CV on held-out text (E=8, k=2): {cvs}")
    assert cvs["data"] < cvs["random"]
    provenance = json.loads((tmp_path / "data" / "moekit_provenance.json").read_text())
    assert provenance["calibration"]["tokens"] == len(texts) * 1024


def test_cluster_split_runs_and_loads(trained_checkpoint, sample_texts, tmp_path):
    dense = trained_checkpoint("dense")
    text = sample_texts["en_docs"]
    out = tmp_path / "moe"
    upcycle_ok(str(dense), "-e", "8", "-k", "8", "--method", "split", "--split-order", "cluster",
               "--router", "zero", "--data", str(text), "--max-tokens", "512", "-o", str(out))
    groups = json.loads((out / "moekit_upcycle_neurons.json").read_text())["0"]["experts"]
    width = json.loads((dense / "config.json").read_text())["intermediate_size"]
    assert sorted(n for g in groups for n in g) == list(range(width))
    assert {len(g) for g in groups} == {width // 8}
    ids = torch.randint(1, 512, (1, 32), generator=torch.Generator().manual_seed(3))
    assert max_diff(dense, out, "Qwen3MoeForCausalLM", ids) < 1e-4  # still a partition


# --- output format -----------------------------------------------------------------------------

def test_shards_provenance_card_and_aux_files(tiny_checkpoint, tmp_path):
    dense = tiny_checkpoint("llama")
    out = tmp_path / "moe"
    upcycle_ok(str(dense), "-e", "4", "-k", "2", "--max-shard-size", "100KB", "-o", str(out))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists() and (out / "README.md").exists()
    provenance = json.loads((out / "moekit_provenance.json").read_text())
    assert provenance["method"] == "copy" and provenance["experts"] == 4
    assert len(provenance["source_fingerprint"]) == 16
    card = (out / "README.md").read_text()  # a local source is named, not a Hub base_model
    assert "base_model:" not in card and f"local checkpoint `{dense}`" in card
    assert max_diff(dense, out, "MixtralForCausalLM") < 1e-5


def test_unaccounted_input_fails_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from moekit.ops.upcycle import run as module

    real = module.output_tensors
    monkeypatch.setattr(module, "output_tensors",
                        lambda *a: [t for t in real(*a) if "input_layernorm" not in t.name])
    out = tmp_path / "moe"
    result = run(str(tiny_checkpoint("llama")), "-e", "4", "-k", "2", "-o", str(out))
    assert result.exit_code != 0 and "not written" in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("source", "args", "message"), [
    ("mixtral", ["-e", "4"], "already an MoE"),
    ("llama", ["-e", "4", "--arch", "deepseek_v3"], "mla attention"),
    ("llama", ["-e", "4", "--arch", "qwen3_moe"], "valid targets for llama: mixtral"),
    ("llama", ["-e", "4", "-k", "5"], "--top-k 5"),
    ("llama", ["-e", "5", "--method", "split"], "valid --experts: 2, 4, 8, 16, 32, 64"),
    ("llama", ["-e", "4", "--shared-expert"], "mixtral has no shared expert"),
    ("qwen3", ["-e", "4", "--router", "data"], "needs calibration text"),
    ("qwen3", ["-e", "4", "--method", "split", "--split-order", "cluster"], "pass --data"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, source, args,
                                                  message):
    out = tmp_path / "moe"
    result = run(str(tiny_checkpoint(source)), *args, "-o", str(out))
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_output_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = run(str(tiny_checkpoint("llama")), "-e", "4", "-o", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_dry_run_writes_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "moe"
    result = run(str(tiny_checkpoint("qwen2")), "-e", "4", "-k", "1", "--dry-run", "--json",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["family"] == "qwen2_moe" and report["active_params"] < report["total_params"]
    assert not out.exists()


def test_attention_biases_refused_for_mixtral(tiny_checkpoint, tmp_path):
    out = tmp_path / "moe"
    result = run(str(tiny_checkpoint("llama", attention_bias=True)), "-e", "4", "-o", str(out))
    assert result.exit_code == 2 and "which mixtral cannot" in result.output
    assert not out.exists()


# --- config and streaming internals ------------------------------------------------------------

def test_target_extra_keys_exist_in_transformers():
    from transformers import AutoConfig

    from moekit.ops.upcycle.config import TARGETS

    for name, target in TARGETS.items():
        known = AutoConfig.for_model(name).to_dict()
        assert set(target.extras) <= set(known), name
        assert target.attention_bias is None or target.attention_bias in known, name


def test_config_validation_in_a_child_process(tiny_checkpoint):
    from moekit.errors import InvalidArgumentError
    from moekit.ops.upcycle import UpcycleOptions, plan_upcycle
    from moekit.ops.upcycle.config import finish_validation, start_validation

    plan = plan_upcycle(tiny_checkpoint("llama"), UpcycleOptions(experts=4, top_k=2))
    finish_validation(start_validation(plan.config, plan.family, plan.shape, in_process=False))
    broken = {**plan.config, "num_local_experts": 3}
    with pytest.raises(InvalidArgumentError, match="expected"):
        finish_validation(start_validation(broken, plan.family, plan.shape, in_process=False))


def test_plain_copy_never_imports_torch(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from moekit.ops.upcycle import upcycle, UpcycleOptions; "
            f"upcycle({str(tiny_checkpoint('qwen2'))!r}, {str(tmp_path / 'moe')!r}, "
            "UpcycleOptions(experts=4, top_k=2)); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
    assert max_diff(tiny_checkpoint("qwen2"), tmp_path / "moe", "Qwen2MoeForCausalLM") < 1e-5


def test_split_with_data_router_predicts_expert_mass(trained_checkpoint, sample_texts, tmp_path):
    dense = trained_checkpoint("dense")
    text = sample_texts["code_py"]
    out = tmp_path / "moe"
    upcycle_ok(str(dense), "-e", "8", "-k", "2", "--method", "split", "--router", "data",
               "--data", str(text), "--max-tokens", "512", "-o", str(out))
    model = load(out, "Qwen3MoeForCausalLM")
    router = model.model.layers[0].mlp.gate.weight
    assert router.shape == (8, model.config.hidden_size) and router.abs().sum() > 0
    provenance = json.loads((out / "moekit_provenance.json").read_text())
    assert provenance["function_preserving"].startswith("approximate")


def test_split_into_widths_the_grouped_kernel_cannot_run(tiny_checkpoint, tmp_path):
    """64 neurons into 32 experts: width 2 (8 bytes per fp32 row). transformers' default
    experts kernel cannot run that; upcycle says so, and moekit's loader runs it (eager)."""
    from moekit.runtime.loading import load_model

    dense, out = tiny_checkpoint("qwen3"), tmp_path / "moe"
    result = run(str(dense), "--arch", "qwen3_moe", "-e", "32", "-k", "32", "--method", "split",
                 "--router", "zero", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "not a multiple of 16 bytes" in " ".join(result.output.split())
    with pytest.raises(RuntimeError, match="16 bytes"):
        logits(load(out))
    moe = load_model(out, device="cpu", dtype="float32")
    assert (logits(moe) - logits(load(dense))).abs().max() < 1e-5
    aligned = run(str(dense), "--arch", "qwen3_moe", "-e", "4", "-k", "4", "--method", "split",
                  "--router", "zero", "-o", str(tmp_path / "ok"))
    assert "16 bytes" not in aligned.output
