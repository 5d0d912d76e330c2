"""Quality of expert merging on a small MoE with trained routing (shared fixture), beside pruning.

Profiles `mixtral-e16k2` (16 experts, top-2, 4 layers) on the first half of each of the five
fixture texts (as `bench_prune_quality.py`, whose helpers are reused), captures calibration
activations once on that same first half, and folds 25 % and 50 % of the experts of every layer
with every grouping (hc-smoe, m-smoe, weight) x merging method (average, aligned, fit,
fit-centre, fit-layer), centres
chosen by --criterion. Beside them: the best prune criterion of the prune benchmark (ean) and random
pruning (2 seeds). Evaluation: mean next-token loss (nats) per domain on the second half.
Prints a markdown table and whether the default merge at 50 % is no worse than the best prune.

Usage: .venv/bin/python benchmarks/bench_merge_quality.py [--max-tokens 16384] [--keep DIR]
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
from bench_prune_quality import DOMAINS, FIXTURES, losses, profile, prune  # noqa: E402

GROUPS = ("m-smoe", "hc-smoe", "weight")
METHODS = ("average", "aligned", "fit", "fit-centre", "fit-layer")
PRUNE_CRITERIA = ("ean",)  # the best criterion of bench_prune_quality.py at 25 % and 50 %
SEEDS = (0, 1)
RATIOS = (0.25, 0.5)
DEFAULT = ("m-smoe", "fit-layer")


def calibration(model: Path, texts: Path, tokens: int):  # noqa: ANN201 - Calibration
    """One shared Calibration on the first half of every text (captured on first use)."""
    from moekit.calib.data import DataSource
    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint
    from moekit.ops.merge.run import Calibration

    sources = [DataSource(d, texts / f"{d}.txt") for d in DOMAINS]
    return Calibration(model, describe(Checkpoint(model)), sources,
                       dict(max_tokens=tokens, seq_len=256, batch_size=8, fraction=(0.0, 0.5)))


def merge(model: Path, stats: Path, out: Path, group: str, method: str, ratio: float,
          criterion: str, calib, router: str = "centre") -> dict[int, float]:  # noqa: ANN001
    from moekit.ops.merge import merge_checkpoint
    from moekit.ops.merge.run import choose_merge_plan

    plan, _ = choose_merge_plan(model, stats=stats, ratio=ratio, group=group, method=method,
                                router=router, criterion=criterion, plan_in=None, calib=calib)
    return merge_checkpoint(model, plan, out, overwrite=True, calib=calib).reconstruction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--max-tokens", type=int, default=16384,
                        help="tokens per domain for evaluation")
    parser.add_argument("--profile-tokens", type=int, default=100_000)
    parser.add_argument("--calib-tokens", type=int, default=8192,
                        help="calibration tokens in all, for grouping and fitting")
    parser.add_argument("--criterion", default="ean", help="centre criterion of the merges")
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--no-prune", action="store_true", help="merges only (split runs)")
    parser.add_argument("--keep", type=Path, help="keep the profile and models here")
    args = parser.parse_args()
    model, texts = args.fixtures / "models" / "mixtral-e16k2", args.fixtures / "text"
    if not model.exists():
        sys.exit(f"fixture {model} not found (pass --fixtures)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="moekit-bench-merge-"))
    try:
        run(model, texts, work, args)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def run(model: Path, texts: Path, work: Path, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    stats = work / "profile"
    if not (stats / "metadata.json").exists():
        profile(model, texts, stats, args.profile_tokens)
    calib = calibration(model, texts, args.calib_tokens)
    rows: dict[tuple[str, str], dict[str, float]] = {
        ("0", "unmerged"): losses(model, texts, args.max_tokens)}
    errors: dict[tuple[str, str], float] = {}
    prunes = [] if args.no_prune else [(c, 0) for c in PRUNE_CRITERIA] + [
        ("random", s) for s in SEEDS]
    for ratio in (float(r) for r in args.ratios.split(",")):
        label = f"{ratio:.0%}"
        for criterion, seed in prunes:
            out = work / f"prune-{criterion}-{seed}-{ratio}"
            prune(model, stats, out, criterion, ratio, seed)
            name = f"prune {criterion}" if criterion != "random" else f"prune random ({seed})"
            rows[(label, name)] = _eval(out, texts, args, start, label, name)
            shutil.rmtree(out, ignore_errors=True)
        for group in args.groups.split(","):
            for method in args.methods.split(","):
                out = work / f"merge-{group}-{method}-{ratio}"
                recon = merge(model, stats, out, group, method, ratio, args.criterion, calib)
                name = f"merge {group} / {method}"
                if recon:
                    errors[(label, name)] = statistics.mean(recon.values())
                rows[(label, name)] = _eval(out, texts, args, start, label, name)
                shutil.rmtree(out, ignore_errors=True)
    report(rows, errors, args)


def _eval(out: Path, texts: Path, args: argparse.Namespace, start: float, label: str,
          name: str) -> dict[str, float]:
    result = losses(out, texts, args.max_tokens)
    print(f"{label} {name}: mean {statistics.mean(result.values()):.4f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return result


def report(rows: dict[tuple[str, str], dict[str, float]], errors: dict[tuple[str, str], float],
           args: argparse.Namespace) -> None:
    print(f"\n## Merging mixtral-e16k2 (16 experts, top-2): eval loss (nats), second half of each "
          f"text, <= {args.max_tokens} tokens per domain; profile and {args.calib_tokens} "
          f"calibration tokens from the first half; centres by {args.criterion}\n")
    print("| removed | method | " + " | ".join(DOMAINS) + " | mean | fit error |")
    print("|---" * (len(DOMAINS) + 4) + "|")
    means = {key: statistics.mean(values.values()) for key, values in rows.items()}
    for key, values in rows.items():
        cells = [f"{values[d]:.4f}" for d in DOMAINS] + [f"**{means[key]:.4f}**"]
        error = f"{errors[key]:.1%}" if key in errors else "-"
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {error} |")
    print()
    for ratio in (f"{float(r):.0%}" for r in args.ratios.split(",")):
        prunes = [k for k in means if k[0] == ratio and k[1].startswith("prune ")
                  and "random" not in k[1]]
        if not prunes:
            continue
        best = min(prunes, key=means.get)
        merges = [k for k in means if k[0] == ratio and k[1].startswith("merge ")]
        best_merge = min(merges, key=means.get)
        default = (ratio, f"merge {DEFAULT[0]} / {DEFAULT[1]}")
        random_mean = statistics.mean(means[k] for k in means if k[0] == ratio and "random" in k[1])
        verdict = ("no worse than" if means.get(default, 1e9) <= means[best] + 1e-4
                   else "WORSE than")
        print(f"- {ratio}: best prune {best[1]} {means[best]:.4f}; best merge {best_merge[1]} "
              f"{means[best_merge]:.4f}; default merge {means.get(default, float('nan')):.4f} "
              f"({verdict} the best prune); random prune mean {random_mean:.4f}")


if __name__ == "__main__":
    main()
