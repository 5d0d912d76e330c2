#!/usr/bin/env python3
"""Cost of recording every profile statistic vs the plain forward pass on the same batches.

Same model, dtype, tokens and batches; `torch.set_num_threads` fixed; one warm-up pass each;
then repetitions that alternate plain / recorded passes, and the median of each. A recorded
pass = attach the hooks, run all batches, copy the sums to the host (the `profile` loop minus
data loading and file writing). Uses ../shared/fixtures/models/mixtral-e16k2 when present, else
a small random Mixtral built here. Example:

    .venv/bin/python benchmarks/bench_profile.py --threads 1 --reps 15

`--torch-profile` also prints torch.profiler's table (CPU and, when present, CUDA activity) of
one plain and one recorded pass, top 20 by self time, with the count of operator calls and
kernel launches per pass: where the recording's time goes on a device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from moekit.calib.hooks import RoutingHooks  # noqa: E402
from moekit.calib.recorder import Recorder  # noqa: E402
from moekit.families.registry import resolve  # noqa: E402
from moekit.ops.profile import forward  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "models" / "mixtral-e16k2"


def build_model(dtype: torch.dtype, device: str, folder: Path | None = None):
    """`folder`, else the fixture model, else a random Mixtral of similar size (4 layers,
    16 experts, top-2)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moekit.runtime.loading import quiet_transformers

    quiet_transformers()
    folder = folder or (FIXTURE if FIXTURE.exists() else None)
    if folder is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        return model.to(device).eval(), str(folder.name)
    config = MixtralConfig(vocab_size=8192, hidden_size=256, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=16, num_experts_per_tok=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype).to(device).eval(), "random"


def plain_pass(model, batches: list[torch.Tensor]) -> None:
    with torch.inference_mode():
        for batch in batches:
            forward(model, batch)


def recorded_pass(engine, family, batches: list[torch.Tensor]) -> None:
    """What `profile` runs: the hooks attached, the batches through moekit.runtime's engine
    (in memory, or streamed layer by layer from the checkpoint), the sums copied to the host."""
    recorder = Recorder(num_domains=1)

    def before(index: int) -> None:
        recorder.set_batch(0, tuple(batches[index].shape))

    with RoutingHooks(engine.model, family, recorder, device=engine.device):
        for _ in engine.run(batches, before=before):
            pass
    recorder.finish()


def engines(model, folder: Path | None, dtype: torch.dtype, device: str) -> dict:
    """The in-memory engine around `model` and, for a checkpoint folder, a streamed one."""
    from moekit.runtime.budget import Plan
    from moekit.runtime.engine import Engine, open_model

    out = {"memory": Engine(Path("."), model, torch.device(device), dtype,
                            Plan("memory", "benchmark", None))}
    if folder is not None:
        out["stream"] = open_model(folder, device=device, dtype=str(dtype).split(".")[-1],
                                   stream=True)
    return out


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. CPU time is far less sensitive than
    wall time to other jobs on a shared machine."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def report(label: str, runs: list[tuple[float, float]], tokens: int) -> tuple[float, float]:
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    print(f"{label:<16} wall median {wall:.3f} s (min {min(r[0] for r in runs):.3f}, "
          f"{tokens / wall:,.0f} tokens/s)   CPU median {cpu:.3f} s "
          f"(min {min(r[1] for r in runs):.3f})")
    return wall, cpu


def torch_profile(model, engine, family, batches: list[torch.Tensor], rows: int = 20) -> None:
    """Print torch.profiler tables of one plain and one recorded pass (after the warm-up):
    top `rows` operators by self device time (CUDA) and by self CPU time, and per pass the
    number of top-level operator calls and of kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    cuda = any(b.is_cuda for b in batches)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for label, fn, args in (("plain forward", plain_pass, (model, batches)),
                            ("profile (all)", recorded_pass, (engine, family, batches))):
        with profile(activities=activities) as prof:
            fn(*args)
            if cuda:
                torch.cuda.synchronize()
        events = prof.events()
        top = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
        launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel",
                                                      "cudaLaunchKernelExC"))
        print(f"\n== torch.profiler: {label}, {len(batches)} batches: {top} top-level aten "
              f"calls" + (f", {launches} kernel launches" if cuda else ""))
        table = prof.key_averages()
        sorts = (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]
        for key in sorts:
            print(f"-- top {rows} by {key}")
            print(table.table(sort_by=key, row_limit=rows, max_name_column_width=48))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stream", action="store_true",
                        help="also time a streamed profile (layers read from the checkpoint)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a checkpoint folder instead of the fixture")
    parser.add_argument("--torch-profile", action="store_true",
                        help="also print torch.profiler tables of one plain and one recorded pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, name = build_model(getattr(torch, args.dtype), args.device, args.model)
    folder = args.model or (FIXTURE if FIXTURE.exists() else None)
    runs = engines(model, folder if args.stream else None, getattr(torch, args.dtype),
                   args.device)
    family = resolve(model.config.to_dict()).family
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len),
                             generator=generator).to(args.device) for _ in range(args.batches)]
    tokens = args.batches * args.batch_size * args.seq_len
    plain_pass(model, batches)
    for engine in runs.values():
        recorded_pass(engine, family, batches)
    plain, recorded, streamed = [], [], []
    for _ in range(args.reps):
        plain.append(timed(plain_pass, model, batches))
        recorded.append(timed(recorded_pass, runs["memory"], family, batches))
        if "stream" in runs:
            streamed.append(timed(recorded_pass, runs["stream"], family, batches))
    print(f"model {name} ({family.name}), {args.dtype} on {args.device}, "
          f"{args.threads} thread(s), {tokens} tokens per pass "
          f"({args.batches} x [{args.batch_size}, {args.seq_len}]), {args.reps} interleaved reps")
    p_wall, p_cpu = report("plain forward", plain, tokens)
    r_wall, r_cpu = report("profile (all)", recorded, tokens)
    pairs = sorted(r[0] / p[0] for p, r in zip(plain, recorded, strict=True))
    print(f"ratio profile / plain: wall {r_wall / p_wall:.3f}, CPU {r_cpu / p_cpu:.3f}, "
          f"median of per-rep wall ratios {statistics.median(pairs):.3f}  (target <= 1.10)")
    if streamed:
        s_wall, _ = report("streamed profile", streamed, tokens)
        print(f"throughput streamed / in-memory profile (warm page cache, layers re-read every "
              f"pass): {r_wall / s_wall:.3f}  (target >= 0.7)")
    if args.torch_profile:
        torch_profile(model, runs["memory"], family, batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
