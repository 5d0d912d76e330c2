"""A streamed run's RSS does not grow layer after layer: oneDNN's shape-keyed primitive caches
(one entry per expert token count, `moekit.runtime.caches`) are capped by `open_model`.
Runs in child processes, because both cache sizes are read once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny

from moekit.runtime.caches import VARIABLES

LAYERS = 8
CHILD = """
import json, sys, torch
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
print(json.dumps({"mode": engine.mode, "rss": seen}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("mixtral", tmp_path_factory.mktemp("caches") / "m", num_hidden_layers=LAYERS,
                     hidden_size=512, intermediate_size=512, num_local_experts=8,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                     with_tokenizer=False)


def growth(folder: Path, env: dict[str, str]) -> float:
    """Mean RSS growth per layer (bytes) from the second layer to the last."""
    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout
    record = json.loads(out.splitlines()[-1])
    assert record["mode"] == "stream" and len(record["rss"]) == LAYERS
    rss = record["rss"]
    return (rss[-1] - rss[1]) / (LAYERS - 2)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_streamed_rss_flat_across_layers(checkpoint: Path) -> None:
    capped = growth(checkpoint, {})
    default = growth(checkpoint, {name: "1024" for name in VARIABLES})  # torch's defaults
    print(f"growth per layer: capped {capped / 1e6:.2f} MB, default {default / 1e6:.2f} MB")
    assert default > 2e6, f"the uncapped control grew only {default / 1e6:.1f} MB/layer"
    assert capped < 0.25 * default, (capped, default)
