"""Fixtures of the hardening tests: a writable copy of the tiny Mixtral, synthetic statistics
of it, and a folder of calibration text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prune_support import write_synthetic_stats

from moekit.families.layout import describe
from moekit.io.reader import Checkpoint


@pytest.fixture
def model(tiny_checkpoint, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "model"))


@pytest.fixture
def stats(model: Path, tmp_path: Path) -> Path:
    layout = describe(Checkpoint(model))
    tokens = {layer.index: [float((3 * j + 1) % 7 + 1) for j in range(layer.num_experts)]
              for layer in layout.moe_layers}
    return write_synthetic_stats(tmp_path / "stats", model, tokens, domains={"a": 0.5})


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "fr.txt").write_text("bonjour le monde " * 200)
    return folder
