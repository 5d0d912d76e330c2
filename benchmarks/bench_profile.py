#!/usr/bin/env python3
"""Cost of recording every profile statistic vs the plain forward pass on the same batches.

Same model, dtype, tokens and batches; `torch.set_num_threads` fixed; one warm-up pass each;
then repetitions that alternate plain / recorded passes, and the median of each. A recorded
pass = attach the hooks, run all batches, copy the sums to the host (the `profile` loop minus
data loading and file writing). Uses ../shared/fixtures/models/mixtral-e16k2 when present, else
a small random Mixtral built here. Example:

    .venv/bin/python benchmarks/bench_profile.py --threads 2 --reps 5
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


def build_model(dtype: torch.dtype, device: str):
    """The fixture model, or a random Mixtral of similar size (4 layers, 16 experts, top-2)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    if FIXTURE.exists():
        model = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=dtype)
        return model.to(device).eval(), str(FIXTURE.name)
    config = MixtralConfig(vocab_size=8192, hidden_size=256, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                           num_local_experts=16, num_experts_per_tok=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype).to(device).eval(), "random"


def plain_pass(model, batches: list[torch.Tensor]) -> None:
    with torch.inference_mode():
        for batch in batches:
            forward(model, batch)


def recorded_pass(model, family, batches: list[torch.Tensor]) -> None:
    recorder = Recorder(num_domains=1)
    with RoutingHooks(model, family, recorder), torch.inference_mode():
        for batch in batches:
            recorder.set_batch(0, tuple(batch.shape))
            forward(model, batch)
    recorder.finish()


def timed(fn, *args) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, name = build_model(getattr(torch, args.dtype), args.device)
    family = resolve(model.config.to_dict()).family
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len),
                             generator=generator).to(args.device) for _ in range(args.batches)]
    tokens = args.batches * args.batch_size * args.seq_len
    plain_pass(model, batches)
    recorded_pass(model, family, batches)
    plain, recorded = [], []
    for _ in range(args.reps):
        plain.append(timed(plain_pass, model, batches))
        recorded.append(timed(recorded_pass, model, family, batches))
    p, r = statistics.median(plain), statistics.median(recorded)
    print(f"model {name} ({family.name}), {args.dtype} on {args.device}, "
          f"{args.threads} threads, {tokens} tokens per pass "
          f"({args.batches} x [{args.batch_size}, {args.seq_len}]), {args.reps} reps")
    print(f"plain forward    median {p:.3f} s  ({tokens / p:,.0f} tokens/s)  "
          f"runs {[round(x, 3) for x in plain]}")
    print(f"profile (all)    median {r:.3f} s  ({tokens / r:,.0f} tokens/s)  "
          f"runs {[round(x, 3) for x in recorded]}")
    print(f"ratio profile / plain = {r / p:.3f}  (target <= 1.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
