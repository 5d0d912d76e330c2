#!/usr/bin/env python3
"""Layer streaming: peak memory under --max-memory, and speed against the in-memory run.

1. memory: writes a synthetic Mixtral-shaped checkpoint of random bf16 (per-expert Hub keys,
   one shard per layer, written layer by layer) into a temporary folder, then `profile`s it in a
   child process with `max_memory` well below its size. Prints the child's peak RSS (VmHWM from
   /proc) next to the checkpoint size, the largest layer, the embeddings/head and activations.
2. warm speed: a smaller checkpoint that fits; profile in memory vs streamed, each in a fresh
   child process, interleaved, median of `--reps`; page cache warm. Tokens/s include loading.
3. cold speed: the same streamed profile after evicting the checkpoint's pages from the page
   cache (posix_fadvise DONTNEED on each shard, no root needed); compared with the raw
   sequential read rate of the same files measured cold right before.

Everything is deleted at the end (unless --keep). Example (about 10 min on 2 busy cores):

    .venv/bin/python benchmarks/bench_stream.py --layers 8 --hidden 2048 --ffn 4096
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = [f"{p.stem}={p}" for p in sorted((ROOT / "sample_data").glob("*.txt"))]


def write_checkpoint(folder: Path, layers: int, hidden: int, ffn: int, experts: int,
                     vocab: int = 32000, seed: int = 0) -> int:
    """Random bf16 Mixtral weights, one shard per layer (+ one for embeddings/head); returns
    the bytes written. At most one layer is in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tokenizer

    config = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                           num_hidden_layers=layers, num_attention_heads=hidden // 128,
                           num_key_value_heads=max(1, hidden // 512), num_local_experts=experts,
                           num_experts_per_tok=2, max_position_embeddings=4096,
                           tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    heads, kv = config.num_attention_heads * 128, config.num_key_value_heads * 128
    total, weight_map, names = 0, {}, []
    shards = layers + 1
    for index in range(shards):
        tensors: dict[str, torch.Tensor] = {}
        if index == layers:
            tensors = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight":
                       (vocab, hidden), "model.norm.weight": (hidden,)}
        else:
            p = f"model.layers.{index}."
            tensors = {p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads, hidden),
                       p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads),
                       p + "block_sparse_moe.gate.weight": (experts, hidden)}
            for j in range(experts):
                e = f"{p}block_sparse_moe.experts.{j}."
                tensors |= {e + "w1.weight": (ffn, hidden), e + "w3.weight": (ffn, hidden),
                            e + "w2.weight": (hidden, ffn)}
        data = {k: (torch.randn(shape, generator=gen) * (0.02 if len(shape) > 1 else 1.0)
                    + (0 if len(shape) > 1 else 1.0)).to(torch.bfloat16)
                for k, shape in tensors.items()}
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(data, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in data.values())
        weight_map |= {k: name for k in data}
        names.append(name)
        del data
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: profile once, print one JSON line with times and VmHWM."""
    start = time.perf_counter()
    # everything a profile imports, before the baseline RSS is taken
    import pandas  # noqa: F401
    import torch
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401

    import moekit.calib.hooks  # noqa: F401
    import moekit.runtime.engine  # noqa: F401
    import moekit.stats.profile_io  # noqa: F401
    from moekit.calib.data import DataSource
    from moekit.calib.spec import DataSpec
    from moekit.ops.profile import profile_model
    from moekit.runtime.options import RunOptions

    baseline = _status("VmRSS")
    t0 = time.perf_counter()
    data = DataSpec(tuple(DataSource.parse(v) for v in SAMPLE), seq_len=args.seq_len,
                    max_tokens=args.tokens)
    run = RunOptions(device=args.device, max_memory=args.max_memory)
    profile = profile_model(Path(args.model), data, run=run, batch_size=args.batch,
                            stream={"yes": True, "no": False}.get(args.stream))
    elapsed = time.perf_counter() - t0
    tokens = int(profile.layer_stats.query("domain == 'all'")["tokens"].iloc[0])
    gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"seconds": elapsed, "tokens": tokens, "vmhwm": _status("VmHWM"),
                      "baseline_rss": baseline, "runtime": profile.metadata["runtime"],
                      "startup": t0 - start, "gpu_peak": gpu_peak}))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(model: Path, **options: object) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model)]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (posix_fadvise DONTNEED)."""
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_rate(folder: Path) -> float:
    """Cold sequential read rate of the shards, bytes/s."""
    evict(folder)
    total, start = 0, time.perf_counter()
    buffer = bytearray(16 << 20)
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    return total / (time.perf_counter() - start)


def sizes(model: Path, device: str = "cpu") -> tuple[int, int, int]:
    """(largest layer, resident budgeted, resident loaded by profile) bytes in the load dtype:
    the budget counts the LM head, which profile never reads."""
    from moekit.runtime.engine import open_model

    engine = open_model(model, device=device, stream=True)
    loaded = sum(p.numel() * p.element_size() for p in engine.model.parameters() if not p.is_meta)
    return max(engine.sizes.layers), engine.sizes.resident, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--stream", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--max-memory", default="auto")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (cuda: budget is VRAM)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sample_data file")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--skip", default="", help="comma list of memory,warm,cold")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="moekit-bench-stream-", dir=args.workdir))
    try:
        skip = set(args.skip.split(","))
        if "memory" not in skip:
            memory_bench(work / "big", args)
        if not {"warm", "cold"} <= skip:
            speed_bench(work / "small", args, skip)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def memory_bench(folder: Path, args: argparse.Namespace) -> None:
    folder.mkdir()
    t0 = time.perf_counter()
    total = write_checkpoint(folder, args.layers, args.hidden, args.ffn, args.experts)
    print(f"wrote {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s ({folder})")
    largest, resident, loaded = sizes(folder, args.device)
    # room for the next layer in memory (prefetched) / for one layer only (page-cache hint)
    budgets = [args.max_memory] if args.max_memory != "auto" else \
        [f"{int(resident + f * largest) // 10**6}MB" for f in (2.2, 1.2)]
    for budget in budgets:
        memory_run(folder, args, budget, total, largest, loaded)


def memory_run(folder: Path, args: argparse.Namespace, budget: str, total: int, largest: int,
               loaded: int) -> None:
    out = run_child(folder, max_memory=budget, tokens=args.tokens, seq_len=args.seq_len,
                    batch=args.batch, device=args.device)
    windows = out["tokens"]
    activations = windows * args.hidden * 2
    target = out["baseline_rss"] + loaded + 2 * largest + activations
    print(f"checkpoint {total / 1e9:.2f} GB | largest layer {largest / 1e9:.3f} GB | "
          f"embeddings+norm (loaded) {loaded / 1e9:.3f} GB | activations "
          f"{activations / 1e6:.1f} MB | --max-memory {budget}")
    print(f"peak RSS (VmHWM) {out['vmhwm'] / 1e9:.3f} GB; after imports "
          f"{out['baseline_rss'] / 1e9:.3f} GB; peak - imports = "
          f"{(out['vmhwm'] - out['baseline_rss']) / 1e9:.3f} GB "
          f"= {(out['vmhwm'] - out['baseline_rss']) / largest:.2f} x largest layer; "
          f"target (imports + embeddings + 2 x layer + activations) {target / 1e9:.3f} GB -> "
          f"{'OK' if out['vmhwm'] <= target else 'OVER'}")
    print(f"mode: {out['runtime']['mode']} ({out['runtime']['reason']}); {out['seconds']:.1f} s "
          f"for {windows} tokens; GPU peak allocated {out['gpu_peak'] / 1e9:.3f} GB")


def speed_bench(folder: Path, args: argparse.Namespace, skip: set[str]) -> None:
    folder.mkdir()
    layers, hidden, ffn = args.layers, args.hidden // 2, args.ffn // 4
    total = write_checkpoint(folder, layers, hidden, ffn, args.experts)
    print(f"speed model: {total / 1e9:.2f} GB ({layers} layers, H={hidden}, I={ffn}, "
          f"E={args.experts})")
    options = dict(tokens=args.tokens, seq_len=args.seq_len, batch=args.batch, device=args.device)
    run_child(folder, stream="no", **options)  # warm the page cache and the imports
    if "warm" not in skip:
        times: dict[str, list[float]] = {"no": [], "yes": []}
        for _ in range(args.reps):
            for mode in ("no", "yes"):
                out = run_child(folder, stream=mode, **options)
                times[mode].append(out["tokens"] / out["seconds"])
        memory, streamed = (statistics.median(times[m]) for m in ("no", "yes"))
        print(f"warm cache: in memory {memory:,.0f} tok/s, streamed {streamed:,.0f} tok/s "
              f"-> ratio {streamed / memory:.2f} (runs: {times})")
    if "cold" not in skip:
        rate = read_rate(folder)
        evict(folder)
        out = run_child(folder, stream="yes", **options)
        print(f"cold cache: raw read {rate / 1e9:.2f} GB/s -> reading {total / 1e9:.2f} GB takes"
              f" {total / rate:.1f} s; streamed profile took {out['seconds']:.1f} s "
              f"({out['tokens']} tokens), {out['seconds'] / (total / rate):.2f} x the read time")


if __name__ == "__main__":
    main()
