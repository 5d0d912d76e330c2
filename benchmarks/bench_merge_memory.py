"""Peak memory of `moekit merge` on a synthetic multi-GB checkpoint, next to its size.

Builds a Mixtral-shaped bf16 checkpoint of random data (`bench_prune_speed.build_checkpoint`),
then runs `moekit merge SRC --stats S --ratio 0.5 --group weight --method aligned` (data-free:
no model is loaded; every layer's experts are read, aligned with the assignment solver, averaged
and written one layer at a time) in a child process, and reports its peak RSS (ru_maxrss of the
child) beside the checkpoint size and one layer's experts (bf16 on disk, float32 in memory).
The calibrated methods (and the calibrated prune) run the model layer by layer under
`--max-memory`: see `bench_calibrated_memory.py`.

Usage: .venv/bin/python benchmarks/bench_merge_memory.py [--gb 4] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune_speed import build_checkpoint, write_stats_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.0, help="checkpoint size to build")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moekit-bench-merge-mem-", dir=args.dir))
    try:
        run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> None:
    source, stats, out = work / "src", work / "stats", work / "out"
    layers = build_checkpoint(source, args.gb, hidden=args.hidden, inter=args.inter)
    write_stats_for(source, stats)
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    layer_bf16 = 8 * 3 * args.hidden * args.inter * 2
    cmd = [sys.executable, "-c", "from moekit.cli.app import main; main()", "merge", str(source),
           "--stats", str(stats), "--ratio", "0.5", "--group", "weight", "--method", "aligned",
           "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print("\n| checkpoint | layers | one layer's experts (bf16 / fp32) | output | merge time | "
          "peak RSS |\n|---|---|---|---|---|---|")
    print(f"| {size / 1e9:.2f} GB | {layers} | {layer_bf16 / 1e6:.0f} MB / "
          f"{2 * layer_bf16 / 1e6:.0f} MB | {written / 1e9:.2f} GB | {seconds:.0f} s | "
          f"**{peak / 1e6:.0f} MB** ({peak / size:.1%} of the checkpoint) |")


if __name__ == "__main__":
    main()
