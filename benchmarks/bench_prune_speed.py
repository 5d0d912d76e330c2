"""Speed and memory of `moekit prune` against `cp`, timed as whole processes, fsync on both sides.

Builds a Mixtral-shaped checkpoint of random bf16 data (per-expert w1/w2/w3, router, attention,
embeddings) with moekit's streaming writer, then times, interleaved and in random order:
  prune:      `moekit prune SRC --stats S --ratio 0.5 --out OUT` (moekit fsyncs every file and
              folder before its rename, so the process ends with the output durable);
  prune-cached: the same with MOEKIT_WRITE_BEHIND=0 (no write-behind: the output stays in the
              page cache and the final fsync writes it all), to measure `moekit.io.writeback`;
  prune-kernel: the same with MOEKIT_COPY=kernel (os.copy_file_range), to compare copy paths;
  cp:         `sh -c 'cp KEPT DST && sync DST'`, KEPT a random file exactly as large as the
              pruned output (`sync FILE` fsyncs it);
each in two cases: `fresh` (OUT and DST absent) and `overwrite` (a previous output is in place:
prune runs with --overwrite, cp overwrites DST). Every job is one child process timed the way
`/usr/bin/time` does: wall clock from spawn to exit, user and system CPU from wait4(). The page
cache state of all inputs (source shards and the cp source) is set explicitly before each run
(cold: fsync then posix_fadvise(DONTNEED); warm: read through). A replaced output is deleted by
moekit in a detached process; the benchmark waits for it to be gone (untimed) before the next
run so that runs never overlap. Reports medians and the throughput ratio (bytes/s of prune over
bytes/s of cp; >= 0.85 is the goal) and the prune child's peak RSS (its own VmHWM at exit).
The first prune run is a discarded warm-up. Big files are deleted at the end. moekit's bytecode
is compiled first (as `pip install` does), so that a PYTHONDONTWRITEBYTECODE=1 environment does
not add about 0.05 s of compiling to every prune run.

Usage: .venv/bin/python benchmarks/bench_prune_speed.py [--gb 3.4] [--reps 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import moekit
from moekit.io.writer import OutTensor, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def build_checkpoint(folder: Path, target_gb: float, hidden: int = 4096, inter: int = 4096,
                     experts: int = 8, dtype: str = "BF16") -> int:
    """A Mixtral-shaped checkpoint of about `target_gb` GB of random bf16 bit patterns (or,
    with dtype F32, normal values x 0.02). Returns #layers."""
    import torch

    size = 4 if dtype == "F32" else 2
    per_layer = size * (3 * experts * hidden * inter + 4 * hidden * hidden + experts * hidden)
    layers = max(1, round(target_gb * 1e9 / per_layer))
    rng = np.random.default_rng(0)

    def random_bf16(name: str, shape: tuple[int, ...]) -> OutTensor:
        def produce():  # noqa: ANN202
            if dtype == "F32":
                return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02)
            raw = rng.integers(0, 2**16, size=int(np.prod(shape)), dtype=np.uint16)
            raw &= 0xBFFF  # keep exponents finite-ish: no inf/nan patterns
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
        return OutTensor.computed(name, dtype, shape, produce)

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
              "torch_dtype": "float32" if dtype == "F32" else "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for path in folder.iterdir():
        _fsync(path)
    return layers


def write_stats_for(model: Path, stats: Path) -> None:
    from moekit.families.fingerprint import model_fingerprint
    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint
    from moekit.stats.expert_stats import write_stats

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


def timed_child(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `cmd` as one child process and measure it like /usr/bin/time: wall seconds from
    spawn to exit, user and system CPU seconds (wait4), and the peak RSS it reported."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    err = proc.stderr.read().decode() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err[-2000:]}")
    peak = [int(x.split()[1]) for x in err.splitlines() if x.startswith("PEAK_RSS_KB")]
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime,
            "rss": peak[0] * 1024 if peak else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.4, help="checkpoint size to build")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--cache", default="cold,warm", help="cache states to run")
    parser.add_argument("--jobs", default="prune,prune-cached,cp",
                        help="jobs to compare (also: prune-kernel)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moekit-bench-prune-", dir=args.dir))
    try:
        run(work, args.gb, args.reps, args.cache.split(","), args.jobs.split(","))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, gb: float, reps: int, states: list[str], jobs: list[str]) -> None:
    model, stats, out = work / "model", work / "stats", work / "out"
    t0 = time.perf_counter()
    layers = build_checkpoint(model, gb)
    compileall.compile_dir(Path(moekit.__file__).parent, quiet=1)
    write_stats_for(model, stats)
    shards = sorted(model.glob("*.safetensors"))
    source_bytes = sum(p.stat().st_size for p in shards)
    print(f"built {source_bytes / 1e9:.2f} GB ({layers} layers x 8 experts) in "
          f"{time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.1f}")
    prune_cmd = [sys.executable, "-c", MOEKIT, "prune", str(model), "--stats", str(stats),
                 "--ratio", "0.5", "--criterion", "reap", "--out", str(out)]
    kept_bytes = _warm_up(prune_cmd, out)
    kept, dst = work / "kept.bin", work / "cp-dst.bin"
    _random_file(kept, kept_bytes)
    commands = {"prune": (prune_cmd, None),
                "prune-cached": (prune_cmd, {"MOEKIT_WRITE_BEHIND": "0"}),
                "prune-kernel": (prune_cmd, {"MOEKIT_COPY": "kernel"}),
                "cp": (["sh", "-c", f"cp '{kept}' '{dst}' && sync '{dst}'"], None)}
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for rep in range(reps):
        for state in states:
            for case in ("fresh", "overwrite"):
                for job in random.sample(jobs, len(jobs)):
                    cmd, env = commands[job]
                    _prepare(case, job, out, dst, prune_cmd)
                    set_cache([*shards, kept], state)  # same page-cache footprint for all jobs
                    extra = ["--overwrite"] if case == "overwrite" and job != "cp" else []
                    measured = timed_child([*cmd, *extra], env)
                    results.setdefault((job, state, case), []).append(measured)
                    print(f"rep {rep} {state:4} {case:9} {job:10} {measured['wall']:6.2f} s "
                          f"(user {measured['user']:.2f}, sys {measured['sys']:.2f}; load "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
                    _wait_old_gone(out)
    _report(results, kept_bytes, source_bytes, reps, states, jobs)


def _prepare(case: str, job: str, out: Path, dst: Path, prune_cmd: list[str]) -> None:
    """`fresh`: no previous output. `overwrite`: a previous output (or cp target) in place."""
    shutil.rmtree(out, ignore_errors=True)
    dst.unlink(missing_ok=True)
    subprocess.run(["sync"], check=False)
    if case == "overwrite":
        if job == "cp":
            shutil.copyfile(out.parent / "kept.bin", dst)
        else:
            timed_child(prune_cmd)
        subprocess.run(["sync"], check=False)


def _wait_old_gone(out: Path) -> None:
    """Untimed: wait for the detached deletion of a replaced output, then flush everything."""
    for _ in range(600):
        if not list(out.parent.glob(f".{out.name}.moekit-*")):
            break
        time.sleep(0.1)
    subprocess.run(["sync"], check=False)


def _warm_up(prune_cmd: list[str], out: Path) -> int:
    measured = timed_child(prune_cmd)
    kept = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"warm-up prune (discarded): {measured['wall']:.2f} s, peak RSS "
          f"{measured['rss'] / 2**20:.0f} MiB, output {kept / 1e9:.2f} GB")
    return kept


def _random_file(path: Path, size: int) -> None:
    rng = np.random.default_rng(1)
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = min(left, 1 << 20)
            handle.write(rng.bytes(chunk))
            left -= chunk
        handle.flush()
        os.fsync(handle.fileno())


def _report(results: dict, kept: int, source: int, reps: int, states: list[str],
            jobs: list[str]) -> None:
    print(f"\n## prune (ratio 0.5) vs cp: whole processes, fsync on both sides, {reps} "
          "interleaved reps, medians\n")
    print("| cache | case | job | wall s | user s | sys s | GB/s | throughput vs cp |")
    print("|---|---|---|---|---|---|---|---|")
    for state in states:
        for case in ("fresh", "overwrite"):
            cp = statistics.median(r["wall"] for r in results[("cp", state, case)])
            for job in jobs:
                rows = results[(job, state, case)]
                wall = statistics.median(r["wall"] for r in rows)
                user = statistics.median(r["user"] for r in rows)
                sys_ = statistics.median(r["sys"] for r in rows)
                ratio = "1.00x" if job == "cp" else f"**{cp / wall:.2f}x**"
                print(f"| {state} | {case} | {job} | {wall:.2f} | {user:.2f} | {sys_:.2f} | "
                      f"{kept / wall / 1e9:.2f} | {ratio} |")
    peaks = [r["rss"] for key, rows in results.items() if key[0] != "cp" for r in rows]
    print(f"\nbytes written {kept / 1e9:.2f} GB of a {source / 1e9:.2f} GB checkpoint; "
          f"prune peak RSS {max(peaks) / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
