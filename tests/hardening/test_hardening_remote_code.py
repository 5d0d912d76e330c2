"""Issue #11, defect 1: code shipped inside a checkpoint never runs and transformers never
prompts, unless the user passes --trust-remote-code."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import UnsafeCheckpointError
from moekit.io.remote_code import check_remote_code, code_files

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("the checkpoint's code ran")
from transformers import {base}Config, {base}ForCausalLM

class EvilConfig({base}Config):
    model_type = "evil_moe"

class EvilModel({base}ForCausalLM):
    config_class = EvilConfig
"""


def evil_copy(src: Path, dst: Path, base: str = "Mixtral") -> Path:
    """A copy of `src` whose config names an unknown model_type and maps it to evil.py."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = "evil_moe"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "evil.py").write_text(EVIL.format(base=base, marker=str(dst / "RAN")))
    return dst


@pytest.fixture
def no_prompt(monkeypatch):
    """Any attempt to ask on the terminal fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"moekit prompted: {args}")

    monkeypatch.setattr(builtins, "input", refuse)


def _one_line_refusal(result, folder: Path) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "evil.py" in lines[0] and "--trust-remote-code" in lines[0]
    assert not (folder / "RAN").exists(), "the checkpoint's code ran"


@pytest.mark.parametrize("command", [
    ["profile", "{m}", "--out", "{tmp}/prof", "--max-tokens", "64"],
    ["eval", "{m}", "--max-tokens", "64"],
    ["eval", "{t}", "--ref", "{m}", "--max-tokens", "64"],
    ["eval", "{t}", "--tokenizer", "{m}", "--max-tokens", "64"],
])
def test_profile_and_eval_refuse_checkpoint_code(tiny_checkpoint, tmp_path, no_prompt, command):
    good = tiny_checkpoint("mixtral")
    evil = evil_copy(good, tmp_path / "evil")
    args = [a.format(m=evil, t=good, tmp=tmp_path) for a in command]
    _one_line_refusal(CliRunner().invoke(app, args), evil)
    assert not (tmp_path / "prof").exists()


def test_upcycle_data_router_refuses_checkpoint_code(tiny_checkpoint, tmp_path, no_prompt):
    evil = evil_copy(tiny_checkpoint("llama"), tmp_path / "evil", base="Llama")
    text = tmp_path / "t.txt"
    text.write_text("some calibration text, repeated. " * 50)
    result = CliRunner().invoke(app, ["upcycle", str(evil), "-e", "4", "-k", "2", "--router",
                                      "data", "--data", str(text), "--max-tokens", "64",
                                      "-o", str(tmp_path / "out")])
    _one_line_refusal(result, evil)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_custom_tokenizer_code_is_refused(tiny_checkpoint, tmp_path, no_prompt):
    folder = shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["evil.EvilTok", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeCheckpointError, match="tokenizer_config.json auto_map -> evil.py"):
        check_remote_code(folder, trust=False)
    check_remote_code(folder, trust=True)


def test_known_model_type_with_auto_map_is_loaded_with_builtin_code(tiny_checkpoint, tmp_path,
                                                                      no_prompt):
    """DeepSeek-V3-style configs keep an auto_map for old transformers; the built-in class is
    used and the .py file never runs."""
    folder = shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "known")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL.format(base="Mixtral", marker=str(folder / "RAN")))
    from moekit.runtime.loading import load_model

    check_remote_code(folder, trust=False)
    assert type(load_model(folder, "cpu")).__name__ == "MixtralForCausalLM"
    assert not (folder / "RAN").exists()


def test_code_files_names():
    assert code_files({"AutoConfig": "configuration_x.XConfig",
                       "AutoTokenizer": ["tok.Slow", "tok.Fast"],
                       "AutoModel": "org/repo--modeling_x.XModel"}) == [
        "configuration_x.py", "tok.py", "org/repo:modeling_x.py"]


def test_trust_remote_code_flag_lets_it_run(tiny_checkpoint, tmp_path):
    """The flag is the only way in: with it, eval loads the custom class (its module runs)."""
    evil = evil_copy(tiny_checkpoint("mixtral"), tmp_path / "evil")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", "from moekit.cli.app import main; main()", "eval",
                          str(evil), "--max-tokens", "64", "--device", "cpu",
                          "--trust-remote-code", "--json"],
                         capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (evil / "RAN").exists()
    assert json.loads(run.stdout)["overall"]["tokens"] > 0
