#!/usr/bin/env python3
"""Peak memory of the calibrated `prune --data` and `merge` (hc-smoe / m-smoe grouping, output
fitting) on a synthetic multi-GB checkpoint streamed under `--max-memory`, next to its size.

Writes a Mixtral-shaped checkpoint of random bf16 with a tokenizer (`bench_stream.
write_checkpoint`: one shard per layer, at most one layer in memory while writing), then runs
each command in a fresh child process and reports its peak RSS (ru_maxrss from wait4) beside
the checkpoint size, the largest layer (the one `--max-memory` must hold), the resident
embeddings + head, and the calibration activations of one layer. Everything is deleted at the
end (unless --keep).

Usage (about 10 minutes on 2 busy cores):

    .venv/bin/python benchmarks/bench_calibrated_memory.py --layers 24 --hidden 2048 --ffn 1024
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune_speed import write_stats_for  # noqa: E402
from bench_stream import ROOT, write_checkpoint  # noqa: E402

DATA = f"code={ROOT / 'sample_data' / 'code_py.txt'}"


def commands(src: Path, stats: Path, work: Path, args: argparse.Namespace) -> dict[str, list]:
    calib = ["--data", DATA, "--device", "cpu", "--max-memory", args.max_memory]
    calib += ["--max-tokens", str(args.tokens)] if args.tokens else []
    calib += ["--seq-len", str(args.seq_len)] if args.seq_len else []
    return {
        "prune --data (measured + compensate)": [
            "prune", src, "--ratio", "0.5", *calib, "--beam", "1", "--out", work / "p1"],
        "prune --data --keep-params 0.5": [
            "prune", src, "--keep-params", "0.5", *calib, "--beam", "1", "--out", work / "p2"],
        "merge --group hc-smoe --method fit": [
            "merge", src, "--stats", stats, "--ratio", "0.5", "--group", "hc-smoe",
            "--method", "fit", "--dtype", "auto", *calib, "--out", work / "m1"],
        "merge (default: m-smoe, fit-layer)": [
            "merge", src, "--stats", stats, "--ratio", "0.5", "--dtype", "auto", *calib,
            "--out", work / "m3"],
        "merge --group m-smoe --method fit-centre": [
            "merge", src, "--stats", stats, "--ratio", "0.5", "--group", "m-smoe",
            "--method", "fit-centre", "--dtype", "auto", *calib, "--out", work / "m2"],
    }


def run_child(argv: list) -> tuple[float, int, str, float]:
    """(seconds, peak RSS bytes, the mode line, CPU seconds) of `moekit ARGV` in a fresh
    process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "moekit", *map(str, argv)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    mode = next((line for line in text.splitlines() if "layer by layer" in line
                 or line.startswith("in memory")), "?")
    return (time.perf_counter() - start, usage.ru_maxrss * 1024, mode,
            usage.ru_utime + usage.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512,
                        help="--max-tokens (0: the command's default)")
    parser.add_argument("--seq-len", type=int, default=128,
                        help="--seq-len (0: the command's default)")
    parser.add_argument("--max-memory", default="700MB")
    parser.add_argument("--only", nargs="*", help="substrings of the commands to run")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moekit-bench-calib-mem-", dir=args.dir))
    try:
        run(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> None:
    src, stats = work / "src", work / "stats"
    src.mkdir()
    size = write_checkpoint(src, args.layers, args.hidden, args.ffn, args.experts)
    write_stats_for(src, stats)
    experts = args.experts * 3 * args.hidden * args.ffn * 2
    resident = 2 * 32000 * args.hidden * 2
    activations = (args.tokens or 16384) * args.hidden * 4
    print(f"checkpoint {size / 1e9:.2f} GB ({args.layers} layers); one layer's experts "
          f"{experts / 1e6:.0f} MB (bf16); embeddings + head {resident / 1e6:.0f} MB; "
          f"one layer's block inputs {activations / 1e6:.1f} MB ({args.tokens or 'default'} "
          "tokens, fp32)")
    print("\n| command | mode | time (CPU) | peak RSS | of the checkpoint |\n"
          "|---|---|---|---|---|")
    for name, argv in commands(src, stats, work, args).items():
        if args.only and not any(s in name for s in args.only):
            continue
        seconds, peak, mode, cpu = run_child(argv)
        print(f"| `{name}` | {mode.split(':')[0]} | {seconds:.0f} s ({cpu:.0f} s) | "
              f"**{peak / 1e6:.0f} MB** | "
              f"{peak / size:.1%} |", flush=True)
        for out in work.glob("[pm][0-9]"):
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
