"""Shared fixtures: tiny checkpoints of every family, built once per test session."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a busy CI machine
sys.path.insert(0, str(Path(__file__).parent))

from quant_support import CASES as QUANT_CASES  # noqa: E402
from tiny_models import SAMPLE_DATA, save_tiny, save_trained  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_checkpoint("mixtral", seed=0, **config_overrides)` -> folder (cached per session).

    Treat the folder as read-only: copy it before changing anything."""
    cache: dict[tuple, Path] = {}

    def build(model_type: str, seed: int = 0, **overrides) -> Path:
        key = (model_type, seed, repr(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            cache[key] = save_tiny(model_type, folder, seed=seed, **overrides)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`trained_checkpoint("moe" | "dense")` -> folder of a small model trained on sample_data/
    (tests/tiny_models.py TRAINED; a few CPU seconds, once per session). Read-only."""
    cache: dict[str, Path] = {}

    def build(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = save_trained(kind, tmp_path_factory.mktemp(f"trained-{kind}"))
        return cache[kind]

    return build


@pytest.fixture(scope="session")
def sample_texts() -> dict[str, Path]:
    """{domain: path} of the three sample_data/ texts the trained models learnt from."""
    return {path.stem: path for path in sorted(SAMPLE_DATA.glob("*.txt"))}


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint: Callable[..., Path],
              tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """`quantized(case)` -> (quantized folder, its independent float32 dequantization), for
    the cases of tests/quant_support.py `CASES`. Read-only."""
    cache: dict[str, tuple[Path, Path]] = {}

    def build(case: str) -> tuple[Path, Path]:
        if case not in cache:
            family, make = QUANT_CASES[case]
            cache[case] = make(tiny_checkpoint(family), tmp_path_factory.mktemp(case))
        return cache[case]

    return build
