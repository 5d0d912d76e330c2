"""`moekit stats import`: SGLang / vLLM expert-load dumps become usage-only profiles. Round
trips through `stats export` give identical counts; the imported profile drives
`prune --criterion frequency` to the plan of the profile it came from; malformed or
mismatched dumps are refused in one line with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from moekit.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def profiled(tiny_checkpoint, sample_texts, tmp_path_factory):
    """(model with a dense first layer, its profile folder)."""
    model = tiny_checkpoint("deepseek_v3")
    out = tmp_path_factory.mktemp("serving") / "prof"
    text = next(iter(sample_texts.values()))
    result = runner.invoke(app, ["profile", str(model), "--data", f"d={text}", "--max-tokens",
                                 "2048", "--seq-len", "64", "--no-plots", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return model, out


def tokens(folder, domain: str = "all") -> np.ndarray:
    frame = pd.read_csv(folder / "expert_stats.csv")
    rows = frame[frame["domain"] == domain].sort_values(["layer", "expert"])
    return rows["tokens"].to_numpy()


@pytest.mark.parametrize("fmt, suffix", [("sglang", ".json"), ("sglang", ".pt"),
                                         ("vllm", ".safetensors")])
def test_export_then_import_gives_the_same_counts_and_plan(fmt, suffix, profiled, tmp_path):
    model, prof = profiled
    dump = tmp_path / f"loads{suffix}"
    assert runner.invoke(app, ["stats", "export", str(prof), "-f", fmt, "--out",
                               str(dump)]).exit_code == 0
    imported = tmp_path / "imported"
    result = runner.invoke(app, ["stats", "import", str(dump), "-f", fmt, "--model", str(model),
                                 "--no-plots", "--out", str(imported)])
    assert result.exit_code == 0, result.output
    assert (tokens(imported) == tokens(prof)).all() and tokens(prof).sum() > 0
    assert (tokens(imported, "serving") == tokens(prof)).all()
    assert json.loads((imported / "metadata.json").read_text())["usage_only"] is True
    plans = []
    for stats in (prof, imported):
        plan = tmp_path / f"plan-{stats.name}.json"
        result = runner.invoke(app, ["prune", str(model), "--stats", str(stats), "--ratio",
                                     "0.25", "--criterion", "frequency", "--dry-run",
                                     "--plan-out", str(plan)])
        assert result.exit_code == 0, result.output
        plans.append([layer["kept"] for layer in json.loads(plan.read_text())["layers"]])
    assert plans[0] == plans[1]


def test_usage_only_profile_defaults_to_frequency_and_refuses_norm_criteria(profiled, tmp_path):
    model, prof = profiled
    dump = tmp_path / "loads.json"
    runner.invoke(app, ["stats", "export", str(prof), "-f", "sglang", "--out", str(dump)])
    imported = tmp_path / "imported"
    runner.invoke(app, ["stats", "import", str(dump), "-f", "sglang", "--model", str(model),
                        "--no-plots", "--out", str(imported)])
    base = ["prune", str(model), "--stats", str(imported), "--ratio", "0.25", "--dry-run"]
    result = runner.invoke(app, base)
    assert result.exit_code == 0 and "usage counts only" in result.output
    assert "frequency" in result.output
    refused = runner.invoke(app, [*base, "--criterion", "reap"])
    assert refused.exit_code != 0 and "needs expert output norms" in refused.output


def test_passes_are_summed(profiled, tmp_path):
    model, prof = profiled
    dump = tmp_path / "loads.json"
    runner.invoke(app, ["stats", "export", str(prof), "-f", "sglang", "--out", str(dump)])
    count = json.loads(dump.read_text())["logical_count"]
    dump.write_text(json.dumps({"logical_count": [count, count]}))
    result = runner.invoke(app, ["stats", "import", str(dump), "-f", "sglang", "--model",
                                 str(model), "--no-plots", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert (tokens(tmp_path / "p") == 2 * tokens(prof)).all()


def _bad_dumps(tmp_path, layers: int, experts: int) -> dict[str, tuple[str, object, str]]:
    good = np.zeros((layers, experts), dtype=np.int64)
    dense = good.copy()
    dense[0, 0] = 5
    return {
        "wrong experts": ("sglang", {"logical_count": np.zeros((layers, 5)).tolist()},
                          "counts 5 experts"),
        "wrong layers": ("sglang", {"logical_count": np.zeros((2, experts)).tolist()},
                         "has 2 layers"),
        "dense layer": ("sglang", {"logical_count": dense.tolist()}, "no experts"),
        "negative": ("sglang", {"logical_count": (good - 1).tolist()}, "non-negative integers"),
        "no key": ("sglang", {"counts": good.tolist()}, "has no 'logical_count'"),
        "vllm layers": ("vllm", torch.zeros((layers, experts), dtype=torch.int64),
                        "MoE layers"),
    }


@pytest.mark.parametrize("case", ["wrong experts", "wrong layers", "dense layer", "negative",
                                  "no key", "vllm layers"])
def test_bad_dumps_are_refused_in_one_line(case, profiled, tmp_path):
    model, prof = profiled
    meta = json.loads((prof / "metadata.json").read_text())
    fmt, data, message = _bad_dumps(tmp_path, meta["num_layers"], meta["num_experts"])[case]
    if fmt == "vllm":
        dump = tmp_path / "loads.safetensors"
        save_file({"global_expert_load_window": data}, str(dump))
    else:
        dump = tmp_path / "loads.json"
        dump.write_text(json.dumps(data))
    out = tmp_path / "out"
    result = runner.invoke(app, ["stats", "import", str(dump), "-f", fmt, "--model", str(model),
                                 "--out", str(out)])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()
