"""Speed and memory of `moekit convert --dtype bf16` against `cp`, whole processes, fsync on
both sides.

Builds a Mixtral-shaped float32 checkpoint of random normal data (about `--gb` GB, moekit's
streaming writer; bench_prune_speed.build_checkpoint), then times, interleaved, with the
source in the page cache (warm):
  convert:  `moekit convert SRC --dtype bf16 --out OUT` (reads F32, casts every tensor, writes
            BF16: half the bytes; fsyncs every file before its rename);
  cp:       `sh -c 'cp SRC/*.safetensors DST/ && sync DST/*'` (a copy of the whole source);
Reports median wall seconds, read throughput (source bytes / wall) and the convert child's
peak RSS (its own VmHWM), against the largest tensor (what one-tensor-at-a-time allows).
Timing and the peak-RSS probe come from bench_prune_speed.py.

Usage: .venv/bin/python benchmarks/bench_convert_speed.py [--gb 1.5] [--reps 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune_speed import MOEKIT, build_checkpoint, set_cache, timed_child  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moekit-bench-convert-", dir=args.dir))
    try:
        run(work, args.gb, args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, gb: float, reps: int) -> None:
    import os

    model, out, dst = work / "model", work / "out", work / "cp"
    hidden = 2048
    layers = build_checkpoint(model, gb, hidden=hidden, inter=hidden, dtype="F32")
    largest = 4 * 32000 * hidden  # the embedding table and lm_head
    shards = sorted(model.glob("*.safetensors"))
    source = sum(p.stat().st_size for p in shards)
    print(f"built {source / 1e9:.2f} GB F32 ({layers} layers x 8 experts); largest tensor "
          f"{largest / 1e6:.0f} MB; load average {os.getloadavg()[0]:.1f}")
    convert = [sys.executable, "-c", MOEKIT, "convert", str(model), "--dtype", "bf16",
               "--out", str(out)]
    copy = ["sh", "-c", f"mkdir -p {dst} && cp {model}/*.safetensors {dst}/ && sync {dst}/*"]
    results: dict[str, list[dict[str, float]]] = {"convert": [], "cp": []}
    written = 0
    for rep in range(reps + 1):  # the first round is a discarded warm-up
        for name, cmd in (("convert", convert), ("cp", copy)):
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
            set_cache(shards, "warm")
            run_ = timed_child(cmd)
            if name == "convert":
                written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            if rep:
                results[name].append(run_)
    baseline = timed_child([sys.executable, "-c", "import torch, safetensors\n" + MOEKIT,
                            "--version"])["rss"]
    print(f"peak RSS of python + torch + moekit doing nothing: {baseline / 1e6:.0f} MB")
    for name, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        rss = max(r["rss"] for r in runs)
        print(f"{name:8s} wall {wall:6.2f} s  read {source / wall / 1e9:5.2f} GB/s  "
              f"user {statistics.median(r['user'] for r in runs):5.2f} s  "
              f"sys {statistics.median(r['sys'] for r in runs):5.2f} s"
              + (f"  peak RSS {rss / 1e6:.0f} MB" if rss else ""))
    ratio = statistics.median(r["wall"] for r in results["cp"]) / statistics.median(
        r["wall"] for r in results["convert"])
    print(f"convert vs cp (throughput ratio, source bytes/s): {ratio:.2f}x; convert wrote "
          f"{written / 1e9:.2f} GB; load average {os.getloadavg()[0]:.1f}; {time.ctime()}")


if __name__ == "__main__":
    main()
