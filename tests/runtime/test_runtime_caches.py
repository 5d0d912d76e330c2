"""A streamed run caps oneDNN's shape-keyed primitive caches (`moekit.runtime.caches`) and its
RSS stays bounded layer after layer. What is tested is what moekit controls: the cap is applied
before the first matmul (a user's own value kept), and RSS growth per streamed layer stays far
below one layer's weights. How much oneDNN's cache would grow without the cap depends on the
CPU's ISA (AVX-512 vs AVX2 kernels) and is not asserted. Runs in a child process, because both
cache sizes are read once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny

from moekit.runtime import caches
from moekit.runtime.caches import CAPACITY, VARIABLES

LAYERS, HIDDEN, WIDTH, EXPERTS = 8, 512, 512, 8
LAYER_BYTES = EXPERTS * 3 * HIDDEN * WIDTH * 2  # bf16 expert weights of one layer
CHILD = """
import json, os, sys, torch
from moekit.runtime.caches import VARIABLES
from moekit.runtime.engine import open_model

def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS")) * 1024

engine = open_model(sys.argv[1], device="cpu", dtype="bfloat16", stream=True)
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 200, (4, 128), generator=gen) for _ in range(4)]
seen = []
for _ in engine.run(batches, after_layer=lambda step: seen.append(rss())):
    pass
print(json.dumps({"mode": engine.mode, "rss": seen,
                  "env": {name: os.environ.get(name) for name in VARIABLES}}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("mixtral", tmp_path_factory.mktemp("caches") / "m", num_hidden_layers=LAYERS,
                     hidden_size=HIDDEN, intermediate_size=WIDTH, num_local_experts=EXPERTS,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                     with_tokenizer=False)


def streamed_run(folder: Path) -> dict:
    """The child's record: runtime mode, RSS after each layer, the cache variables it ran with."""
    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], env=clean,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_streamed_rss_flat_across_layers(checkpoint: Path) -> None:
    record = streamed_run(checkpoint)
    assert record["mode"] == "stream" and len(record["rss"]) == LAYERS
    assert record["env"] == {name: CAPACITY for name in VARIABLES}
    rss = record["rss"]
    growth = (rss[-1] - rss[1]) / (LAYERS - 2)
    print(f"growth per layer: {growth / 1e6:.2f} MB (one layer's experts: {LAYER_BYTES / 1e6:.1f}"
          " MB)")
    assert growth < 0.25 * LAYER_BYTES, (growth, LAYER_BYTES)


def test_bound_keeps_a_value_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLES[0], "7")
    monkeypatch.delenv(VARIABLES[1], raising=False)
    caches.bound()
    assert os.environ[VARIABLES[0]] == "7" and os.environ[VARIABLES[1]] == CAPACITY
