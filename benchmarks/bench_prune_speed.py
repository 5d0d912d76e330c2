"""Speed and memory of `moekit prune` against `cp` on a synthetic multi-GB checkpoint.

Builds a Mixtral-shaped checkpoint of random bf16 data (per-expert w1/w2/w3, router, attention,
embeddings) with moekit's streaming writer, then times, interleaved and in random order:
  prune: `moekit prune SRC --stats S --ratio 0.5 --out OUT` in a child process, plus fsync of
         every output file;
  cp:    `cp KEPT DST` of a random file exactly as large as the pruned output, plus fsync;
with the page cache state of all inputs (source shards and the cp source) set explicitly before
each run (cold: fsync then posix_fadvise(DONTNEED); warm: read through). Reports wall times,
throughput ratio (bytes/s of prune over bytes/s of cp; >= 0.85 is the goal) and the prune
child's peak RSS (VmHWM of the child, read by itself at exit). The first prune run is a
discarded warm-up. Big files are deleted at the end.

Usage: .venv/bin/python benchmarks/bench_prune_speed.py [--gb 6] [--reps 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moekit.io.writer import OutTensor, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def build_checkpoint(folder: Path, target_gb: float, hidden: int = 4096, inter: int = 4096,
                     experts: int = 8) -> int:
    """A Mixtral-shaped checkpoint of about `target_gb` GB of random bf16. Returns #layers."""
    import torch

    per_layer = 2 * (3 * experts * hidden * inter + 4 * hidden * hidden + experts * hidden)
    layers = max(1, round(target_gb * 1e9 / per_layer))
    rng = np.random.default_rng(0)

    def random_bf16(name: str, shape: tuple[int, ...]) -> OutTensor:
        def produce():  # noqa: ANN202
            raw = rng.integers(0, 2**16, size=int(np.prod(shape)), dtype=np.uint16)
            raw &= 0xBFFF  # keep exponents finite-ish: no inf/nan patterns
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
        return OutTensor.computed(name, "BF16", shape, produce)

    tensors = []
    for name, shape in [("model.embed_tokens.weight", (32000, hidden)),
                        ("lm_head.weight", (32000, hidden)), ("model.norm.weight", (hidden,))]:
        tensors.append(random_bf16(name, shape))
    for i in range(layers):
        p = f"model.layers.{i}."
        specs = [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        specs += [(p + "input_layernorm.weight", (hidden,)),
                  (p + "post_attention_layernorm.weight", (hidden,)),
                  (p + "block_sparse_moe.gate.weight", (experts, hidden))]
        for j in range(experts):
            e = p + f"block_sparse_moe.experts.{j}."
            specs += [(e + "w1.weight", (inter, hidden)), (e + "w3.weight", (inter, hidden)),
                      (e + "w2.weight", (hidden, inter))]
        for name, shape in specs:
            tensors.append(random_bf16(name, shape))
    folder.mkdir(parents=True)
    write_checkpoint(folder, tensors, max_shard_bytes=2 * 10**9)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_local_experts": experts, "num_experts_per_tok": 2,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for path in folder.iterdir():
        _fsync(path)
    return layers


def write_stats_for(model: Path, stats: Path) -> None:
    from moekit.families.layout import describe
    from moekit.io.fingerprint import model_fingerprint
    from moekit.io.reader import Checkpoint
    from moekit.ops.prune.stats import write_stats

    checkpoint = Checkpoint(model)
    layout = describe(checkpoint)
    rng = random.Random(0)
    rows = [dict(layer=layer.index, expert=j, domain="all", tokens=(t := rng.randint(1, 999)),
                 weight_sum=t * 0.3, ean_sum=t * 2.0, reap_sum=t * rng.random(), max_norm=1.0)
            for layer in layout.moe_layers for j in range(layer.num_experts)]
    write_stats(stats, rows, dict(model_fingerprint=model_fingerprint(checkpoint, layout),
                                  moe_layers=[x.index for x in layout.moe_layers],
                                  num_experts=layout.moe_layers[0].num_experts, top_k=2,
                                  family="mixtral", domains=["all"]))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_cache(paths: list[Path], state: str) -> None:
    """cold: evict from the page cache; warm: read every byte through it."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            if state == "cold":
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 24):
                    pass
        finally:
            os.close(fd)


# Runs the CLI, then reports the process's own peak RSS (VmHWM of its post-exec address space;
# getrusage of a child would also count the forked image of this big parent before exec).
MOEKIT = """
import sys
from moekit.cli.app import main
try:
    main()
except SystemExit as exit:
    code = exit.code
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        sys.stderr.write("PEAK_RSS_KB " + line.split()[1] + "\\n")
sys.exit(code)
"""


def timed_child(cmd: list[str], outputs: Callable[[], list[Path]]) -> tuple[float, int]:
    """Wall seconds of `cmd` plus fsync of the files `outputs()` returns, and the peak RSS the
    child reported (0 if it did not)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    err = proc.stderr.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {err[-2000:]}")
    for path in outputs():
        _fsync(path)
    seconds = time.perf_counter() - start
    peak = [int(x.split()[1]) for x in err.splitlines() if x.startswith("PEAK_RSS_KB")]
    return seconds, (peak[0] * 1024 if peak else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=6.0, help="checkpoint size to build")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moekit-bench-prune-", dir=args.dir))
    try:
        run(work, args.gb, args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, gb: float, reps: int) -> None:
    model, stats, out = work / "model", work / "stats", work / "out"
    t0 = time.perf_counter()
    layers = build_checkpoint(model, gb)
    write_stats_for(model, stats)
    shards = sorted(model.glob("*.safetensors"))
    source_bytes = sum(p.stat().st_size for p in shards)
    print(f"built {source_bytes / 1e9:.2f} GB ({layers} layers x 8 experts) in "
          f"{time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.1f}")
    moekit = [sys.executable, "-c", MOEKIT]
    prune_cmd = [*moekit, "prune", str(model), "--stats", str(stats), "--ratio", "0.5",
                 "--criterion", "reap", "--out", str(out), "--overwrite"]
    kept_bytes = _warm_up(prune_cmd, out)
    kept = work / "kept.bin"
    _random_file(kept, kept_bytes)
    dst = work / "cp-dst.bin"
    results: dict[tuple[str, str], list[float]] = {}
    peaks: list[int] = []
    for rep in range(reps):
        for state in ("cold", "warm"):
            for job in random.sample(["prune", "cp"], 2):
                shutil.rmtree(out, ignore_errors=True)
                dst.unlink(missing_ok=True)
                set_cache([*shards, kept], state)  # same page-cache footprint for both jobs
                if job == "prune":
                    seconds, peak = timed_child(prune_cmd, lambda: _files(out))
                    peaks.append(peak)
                else:
                    seconds, _ = timed_child(["cp", str(kept), str(dst)], lambda: [dst])
                results.setdefault((job, state), []).append(seconds)
                print(f"rep {rep} {state:4} {job:5} {seconds:6.2f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    _report(results, kept_bytes, source_bytes, peaks, reps)


def _warm_up(prune_cmd: list[str], out: Path) -> int:
    seconds, peak = timed_child(prune_cmd, lambda: _files(out))
    kept = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"warm-up prune (discarded): {seconds:.2f} s, peak RSS {peak / 2**20:.0f} MiB, "
          f"output {kept / 1e9:.2f} GB")
    return kept


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] + [folder]


def _random_file(path: Path, size: int) -> None:
    rng = np.random.default_rng(1)
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = min(left, 1 << 24)
            handle.write(rng.bytes(chunk))
            left -= chunk
        handle.flush()
        os.fsync(handle.fileno())


def _report(results: dict, kept: int, source: int, peaks: list[int], reps: int) -> None:
    print(f"\n## prune (ratio 0.5) vs cp, {reps} interleaved reps, medians, fsync included\n")
    print("| cache | prune s | cp s | prune GB/s | cp GB/s | throughput ratio |")
    print("|---|---|---|---|---|---|")
    for state in ("cold", "warm"):
        p = statistics.median(results[("prune", state)])
        c = statistics.median(results[("cp", state)])
        print(f"| {state} | {p:.2f} | {c:.2f} | {kept / p / 1e9:.2f} | {kept / c / 1e9:.2f} | "
              f"**{c / p:.2f}x** |")
    print(f"\nbytes written {kept / 1e9:.2f} GB of a {source / 1e9:.2f} GB checkpoint; "
          f"prune peak RSS {max(peaks) / 2**20:.0f} MiB ({max(peaks) / source:.1%} of the "
          "checkpoint)")


if __name__ == "__main__":
    main()
