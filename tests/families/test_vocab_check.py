"""A tokenizer whose ids do not fit the model's embedding table is refused in one line before
any forward pass (on CUDA such an id is a device-side assert that kills the process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import DataError
from moekit.runtime.engine import open_model

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "en_docs.txt"


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refuses_ids_outside_the_vocabulary(stream, tiny_checkpoint):
    engine = open_model(tiny_checkpoint("mixtral"), device="cpu", stream=stream)
    fine = torch.randint(0, 256, (2, 8))
    assert len(list(engine.run([fine]))) == 1
    for bad in (256, -1):
        ids = fine.clone()
        ids[1, 3] = bad
        with pytest.raises(DataError, match=f"token id {bad} is outside .* 256 entries"):
            engine.run([fine, ids])


@pytest.mark.parametrize("command", ["profile", "eval"])
def test_cli_names_the_mismatch(command, tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("mixtral", vocab_size=64)  # the tokenizer has 259 entries
    args = [command, str(folder), "--data", f"d={SAMPLE}", "--max-tokens", "256",
            "--device", "cpu"]
    if command == "profile":
        args += ["--out", str(tmp_path / "prof")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert "outside this model's vocabulary of 64 entries" in lines[-1]
    assert "Traceback" not in result.output
    assert not (tmp_path / "prof").exists()
