#!/usr/bin/env python3
"""RSS after each layer of a streamed run (`open_model(...).run`, bf16, CPU), with the kernel
caches capped (`moekit.runtime.caches`, the default) and at torch's defaults (1024 entries).

Writes a Mixtral-shaped random bf16 checkpoint (`bench_stream.write_checkpoint`), then runs it
streamed in a fresh child process per setting and prints `VmRSS` after every layer and the
mean growth per layer. Usage (about a minute):

    .venv/bin/python benchmarks/bench_layer_rss.py --layers 12 --hidden 1024 --ffn 512
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream import ROOT, write_checkpoint  # noqa: E402

CHILD = """
import json, sys, torch
from moekit.runtime.engine import open_model

def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS")) * 1024

engine = open_model(sys.argv[1], device="cpu", stream=True)
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, 8000, (4, 128), generator=gen) for _ in range(int(sys.argv[2]))]
seen = []
for _ in engine.run(batches, after_layer=lambda step: seen.append(rss())):
    pass
print(json.dumps(seen))
"""


def trace(folder: Path, batches: int, env: dict[str, str]) -> list[int]:
    from moekit.runtime.caches import VARIABLES

    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(batches)],
                         env={**clean, "PYTHONPATH": str(ROOT), **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    from moekit.runtime.caches import VARIABLES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--batches", type=int, default=4, help="batches of 4 x 128 tokens")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moekit-bench-layer-rss-"))
    try:
        size = write_checkpoint(work, args.layers, args.hidden, args.ffn, 8, vocab=8000)
        print(f"checkpoint {size / 1e6:.0f} MB, {args.layers} layers")
        for name, env in (("capped (default)", {}),
                          ("torch defaults", {v: "1024" for v in VARIABLES})):
            rss = [r // 2**20 for r in trace(work, args.batches, env)]
            print(f"{name}: {rss} MB; {(rss[-1] - rss[0]) / (len(rss) - 1):+.1f} MB/layer")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
