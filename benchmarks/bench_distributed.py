#!/usr/bin/env python3
"""Wall time of `moekit profile` as one process vs `torchrun --nproc-per-node 2` on CPU (gloo).

Runs the whole command (imports, model load, tokenisation, forward passes, reduction, writing)
in interleaved repetitions and prints medians and ratios, for:

    1 rank x 1 thread    python -m moekit profile ...           OMP_NUM_THREADS=1
    1 rank x T threads   python -m moekit profile ...           OMP_NUM_THREADS=T (all cores)
    2 ranks x 1 thread   torchrun --nproc-per-node 2 -m moekit profile ...

Uses ../shared/fixtures/models/mixtral-e16k2 and its texts when present, else a random tiny
Mixtral and sample_data/. Example:

    .venv/bin/python benchmarks/bench_distributed.py --tokens 16000 --reps 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def model_and_data(tmp: Path) -> tuple[Path, list[str]]:
    model = FIXTURES / "models" / "mixtral-e16k2"
    if model.exists():
        texts = [FIXTURES / "text" / f"{name}.txt" for name in ("code_py", "en_docs")]
        return model, [f"{p.stem}={p}" for p in texts]
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny

    return save_tiny("mixtral", tmp / "mixtral"), [
        f"{p.stem}={p}" for p in sorted((ROOT / "sample_data").glob("*.txt"))]


def command(ranks: int, model: Path, data: list[str], out: Path, tokens: int) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable])
    args = ["-m", "moekit", "profile", str(model), "--out", str(out), "--overwrite",
            "--seq-len", "256", "--batch-size", "4", "--max-tokens", str(tokens),
            "--device", "cpu", "--no-plots"]
    return [*launcher, *args, *sum((["--data", d] for d in data), [])]


def timed(cmd: list[str], threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all child processes) of one run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cpu0, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, _children_cpu() - cpu0


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16000, help="tokens per data source")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="moekit-bench-dist-"))
    try:
        model, data = model_and_data(tmp)
        runs = {"1 rank x 1 thread": (1, 1), f"1 rank x {cores} threads": (1, cores),
                "2 ranks x 1 thread": (2, 1)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for rep in range(args.reps):
            for name, (ranks, threads) in runs.items():
                cmd = command(ranks, model, data, tmp / "out", args.tokens)
                wall, used = timed(cmd, threads)
                times[name].append(wall)
                cpu[name].append(used)
                print(f"rep {rep + 1} {name}: {wall:.1f} s wall, {used:.1f} s CPU", flush=True)
        print(f"\nmodel {model.name}, {len(data)} sources x {args.tokens} tokens, "
              f"{cores} cores, {args.reps} interleaved reps (median)")
        base = statistics.median(times["1 rank x 1 thread"])
        print("| run | wall (median) | speed-up vs 1 rank x 1 thread | CPU s, all processes |")
        print("|---|---|---|---|")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"| {name} | {median:.1f} s | {base / median:.2f}x | "
                  f"{statistics.median(cpu[name]):.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
