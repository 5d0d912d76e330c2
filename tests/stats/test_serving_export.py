"""`moekit stats export`: files parsed back the way SGLang and vLLM define them.

The readers below follow the engines' published code, not moekit's writer:
- SGLang `srt/eplb/expert_location.py::compute_initial_expert_location_metadata`: `.pt` via
  `torch.load(weights_only=True)`, `.json` via `json.loads`; key `logical_count`; a 2-D count is
  unsqueezed to [1, num_layers, num_logical_experts] by `init_by_eplb`.
- vLLM `distributed/eplb/eplb_state.py`: `global_expert_load_window` [num_moe_layers,
  num_logical_experts], integer, handed to the policy's `rebalance_experts`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from synthetic_profile import synthetic_profile
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.stats.profile_io import save_profile


def sglang_read(path: Path) -> torch.Tensor:
    text = str(path)
    if text.endswith(".pt"):
        data = torch.load(text, weights_only=True)
    elif text.endswith(".json"):
        data = json.loads(Path(text).read_text())
    else:
        data = json.loads(text)
    assert "logical_count" in data and "physical_to_logical_map" not in data
    count = data["logical_count"]
    if not isinstance(count, torch.Tensor):
        count = torch.tensor(count)
    if len(count.shape) == 2:
        count = count.unsqueeze(0)
    return count


def vllm_read(path: Path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["global_expert_load_window"]
        return f.get_tensor("global_expert_load_window")


@pytest.fixture()
def saved(tmp_path):
    rates = [np.linspace(1, 3, 8), np.linspace(3, 1, 8) ** 2]
    profile, ids = synthetic_profile(rates, k=2, tokens=500, domains=("a", "b"), num_layers=4,
                                     first_moe=2)
    folder = tmp_path / "prof"
    folder.mkdir()
    save_profile(profile, folder)
    truth = np.stack([np.bincount(np.concatenate([d.ravel() for d in per]), minlength=8)
                      for per in ids])
    return folder, truth, ids


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_sglang_roundtrip(saved, tmp_path, suffix):
    folder, truth, _ = saved
    out = tmp_path / f"loads{suffix}"
    result = run("stats", "export", folder, "--format", "sglang", "--out", out)
    assert result.exit_code == 0, result.output
    count = sglang_read(out)
    assert count.shape == (1, 4, 8) and not count.is_floating_point()
    assert (count[0, :2] == 0).all()                      # dense layers 0, 1
    assert np.array_equal(count[0, 2:].numpy(), truth)    # MoE layers 2, 3 by layer id
    assert int(count.sum()) == 2 * 2 * 500 * 2            # layers x domains x tokens x k


def test_vllm_roundtrip_and_domain(saved, tmp_path):
    folder, truth, ids = saved
    out = tmp_path / "loads.safetensors"
    assert run("stats", "export", folder, "-f", "vllm", "-o", out).exit_code == 0
    load = vllm_read(out)
    assert load.dtype == torch.int64 and load.shape == (2, 8)
    assert np.array_equal(load.numpy(), truth)
    out_b = tmp_path / "b.safetensors"
    assert run("stats", "export", folder, "-f", "vllm", "-o", out_b, "--domain", "b"
               ).exit_code == 0
    expect_b = np.stack([np.bincount(per[1].ravel(), minlength=8) for per in ids])
    assert np.array_equal(vllm_read(out_b).numpy(), expect_b)


def test_export_errors_are_one_line(saved, tmp_path):
    folder, _, _ = saved
    for args in (["-f", "vllm", "-o", tmp_path / "x.json"],
                 ["-f", "triton", "-o", tmp_path / "x.json"],
                 ["-f", "sglang", "-o", tmp_path / "x.json", "--domain", "zzz"]):
        result = run("stats", "export", folder, *args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.json").exists()
