"""Shared fixtures: tiny checkpoints of every family, built once per test session."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("USE_HUB_KERNELS", "0")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TINY_DENSE, TINY_MOE, save_tiny  # noqa: E402

MOE_TYPES = list(TINY_MOE)
DENSE_TYPES = list(TINY_DENSE)
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


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


def fixture_path(*parts: str) -> Path:
    """A path under ../shared/fixtures; tests using it skip when it is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared fixture {path} not available")
    return path
