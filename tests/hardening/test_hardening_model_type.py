"""A config.json whose `model_type` transformers does not know, with no `auto_map` to supply
it: the commands that load the model with transformers (profile, eval) refuse in one moekit
line naming the model_type and the fix; the checkpoint-level ones (inspect, prune), which read
the safetensors files and the family record only, keep working. `merge` runs the model for
its calibration pass, so it refuses too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers
from prune_support import write_synthetic_stats
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import UnsupportedModelError
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.io.remote_code import check_remote_code

RUNNER = CliRunner()
UNKNOWN = "mixtral_v9"


def unknown_type_copy(src: Path, dst: Path) -> Path:
    """A copy of `src` (architectures still MixtralForCausalLM) with an unknown model_type."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = UNKNOWN
    config.pop("auto_map", None)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("command", [
    ["profile", "{m}", "--out", "{tmp}/prof", "--max-tokens", "64"],
    ["eval", "{m}", "--max-tokens", "64"],
    ["eval", "{m}", "--trust-remote-code", "--max-tokens", "64"],
    ["eval", "{t}", "--ref", "{m}", "--max-tokens", "64"],
])
def test_model_loading_commands_name_the_model_type_and_the_fix(tiny_checkpoint, tmp_path,
                                                                command):
    good = tiny_checkpoint("mixtral")
    odd = unknown_type_copy(good, tmp_path / "odd")
    result = RUNNER.invoke(app, [a.format(m=odd, t=good, tmp=tmp_path) for a in command])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert f"model_type '{UNKNOWN}'" in lines[0] and "upgrade transformers" in lines[0]
    assert f"transformers {transformers.__version__}" in lines[0]
    assert "does not recognize this architecture" not in result.output  # transformers' own
    assert not (tmp_path / "prof").exists()


def test_merge_calibration_names_the_model_type(tiny_checkpoint, tmp_path):
    odd = unknown_type_copy(tiny_checkpoint("mixtral"), tmp_path / "odd")
    tokens = {layer.index: [float(j + 1) for j in range(layer.num_experts)]
              for layer in describe(Checkpoint(odd)).moe_layers}
    stats = write_synthetic_stats(tmp_path / "stats", odd, tokens)
    result = RUNNER.invoke(app, ["merge", str(odd), "--stats", str(stats), "--ratio", "0.5",
                                 "--group", "weight", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and f"model_type '{UNKNOWN}'" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_level_commands_do_not_need_transformers_to_know_it(tiny_checkpoint,
                                                                       tmp_path):
    odd = unknown_type_copy(tiny_checkpoint("mixtral"), tmp_path / "odd")
    result = RUNNER.invoke(app, ["inspect", str(odd), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["family"] == "mixtral"
    drop = tmp_path / "drop.txt"
    drop.write_text("0: 0 1\n1: 0 1\n")
    result = RUNNER.invoke(app, ["prune", str(odd), "--drop", str(drop), "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == UNKNOWN and config["num_local_experts"] == 6
    assert len(Checkpoint(tmp_path / "out").tensors) < len(Checkpoint(odd).tensors)


def test_policy_on_parsed_configs():
    known = {"model_type": "mixtral"}
    check_remote_code(known, trust=False)
    check_remote_code({"architectures": ["X"]}, trust=False)  # no model_type: transformers' call
    for trust in (False, True):
        with pytest.raises(UnsupportedModelError, match=f"'{UNKNOWN}'"):
            check_remote_code({"model_type": UNKNOWN}, trust=trust)
    # with auto_map code and --trust-remote-code, transformers may load it: not refused here
    check_remote_code({"model_type": UNKNOWN, "auto_map": {"AutoConfig": "x.C"}}, trust=True)
