"""Speed and memory of `moekit convert --dtype bf16` against `cp`, whole processes, fsync on
both sides.

Builds a Mixtral-shaped float32 checkpoint of random normal data (about `--gb` GB, moekit's
streaming writer), then times, interleaved, with the source in the page cache (warm):
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
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune_speed import MOEKIT, set_cache, timed_child  # noqa: E402

from moekit.io.writer import OutTensor, write_checkpoint  # noqa: E402


def build_f32(folder: Path, target_gb: float, hidden: int = 2048, inter: int = 2048,
              experts: int = 8, vocab: int = 32000) -> tuple[int, int]:
    """A Mixtral-shaped float32 checkpoint; returns (#layers, largest tensor bytes)."""
    import torch

    per_layer = 4 * (3 * experts * hidden * inter + 4 * hidden * hidden)
    layers = max(1, round((target_gb * 1e9 - 8 * vocab * hidden) / per_layer))
    rng = np.random.default_rng(0)

    def normal(name: str, shape: tuple[int, ...]) -> OutTensor:
        return OutTensor.computed(name, "F32", shape, lambda: torch.from_numpy(
            rng.standard_normal(shape, dtype=np.float32) * 0.02))

    specs = [("model.embed_tokens.weight", (vocab, hidden)), ("lm_head.weight", (vocab, hidden)),
             ("model.norm.weight", (hidden,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        specs += [(p + "input_layernorm.weight", (hidden,)),
                  (p + "post_attention_layernorm.weight", (hidden,)),
                  (p + "block_sparse_moe.gate.weight", (experts, hidden))]
        for j in range(experts):
            e = p + f"block_sparse_moe.experts.{j}."
            specs += [(e + "w1.weight", (inter, hidden)), (e + "w3.weight", (inter, hidden)),
                      (e + "w2.weight", (hidden, inter))]
    folder.mkdir(parents=True)
    write_checkpoint(folder, [normal(n, s) for n, s in specs], max_shard_bytes=2 * 10**9)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_local_experts": experts, "num_experts_per_tok": 2, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": vocab, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return layers, 4 * vocab * hidden


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
    layers, largest = build_f32(model, gb)
    shards = sorted(model.glob("*.safetensors"))
    source = sum(p.stat().st_size for p in shards)
    print(f"built {source / 1e9:.2f} GB F32 ({layers} layers x 8 experts); largest tensor "
          f"{largest / 1e6:.0f} MB; load average {os.getloadavg()[0]:.1f}")
    convert = [sys.executable, "-c", MOEKIT, "convert", str(model), "--dtype", "bf16",
               "--out", str(out)]
    copy = ["sh", "-c", f"mkdir -p {dst} && cp {model}/*.safetensors {dst}/ && sync {dst}/*"]
    results: dict[str, list[dict[str, float]]] = {"convert": [], "cp": []}
    for rep in range(reps + 1):  # the first round is a discarded warm-up
        for name, cmd in (("convert", convert), ("cp", copy)):
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
            set_cache(shards, "warm")
            run_ = timed_child(cmd)
            if rep:
                results[name].append(run_)
    written = sum(p.stat().st_size for p in out.glob("*.safetensors")) if out.exists() else 0
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
