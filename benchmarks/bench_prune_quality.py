"""Quality of pruning criteria on a small MoE with trained routing (shared fixture).

Profiles `mixtral-e16k2` (16 experts, top-2, 4 layers) with `moekit profile` on the first half
of each of the five fixture texts (`--data-range 0:0.5`), prunes 25 % and 50 % of the experts of
every layer with each criterion (frequency, weight, ean, reap, reap-sum) and with random
selection (3 seeds), and evaluates the mean next-token loss (nats) per domain on the second
half (`0.5:1`, never seen by the profile). Prints a markdown table and checks that every
criterion beats random and that the best one at 25 % stays within 0.02 nats of the unpruned
model.

Data-driven rows (`moekit prune --data ...`, calibrated on the same first halves): `measured`
(re-routed layer error, beam search, no refit), `measured+compensate` (the `--data` default:
refit tried, kept when the held-out KL says so) and `auto` (all candidates, best held-out KL),
plus the stats-only `man` criterion and `ean` with super-expert protection (the new stats-only
default). By name only (`--methods`): `measured+compensate-router` (the default without the
router refit, `--no-refit-router`) and `measured+compensate@16k` (`--max-tokens 16384`).
Each data row records the wall time and peak RSS of its `moekit prune` process.

Other families (`train_small_moe.py`): `--model DIR --texts FOLDER --seq-len 128` (the length
they were trained at), `--data-methods ''` to skip the slow `--data` rows, `--json` for the means.

Usage: .venv/bin/python benchmarks/bench_prune_quality.py [--max-tokens 16384] [--keep DIR]
       [--only-new] [--ratios 0.25,0.5] [--model DIR --texts DIR] [--seq-len 256]
       [--data-methods measured,measured+compensate,auto] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
DOMAINS = ("en_bible", "en_docs", "code_py", "de", "fr")
CRITERIA = ("frequency", "weight", "ean", "reap", "reap-sum")
NEW_STATS = ("man", "ean+super")
DATA_METHODS = {"measured": ["--criterion", "measured", "--no-compensate"],
                "measured+compensate": [],
                "auto": ["--criterion", "auto"],
                "measured+compensate-router": ["--no-refit-router"],
                "measured+compensate@16k": ["--max-tokens", "16384"]}
DEFAULT_DATA = ("measured", "measured+compensate", "auto")
SEEDS = (0, 1, 2)
RATIOS = (0.25, 0.5)
ONLY_NEW = False
SEQ_LEN = 256
JSON: Path | None = None


def profile(model: Path, texts: Path, out: Path, max_tokens: int) -> None:
    """`moekit profile` on the first half of every text (the calibration split)."""
    data = [arg for d in DOMAINS for arg in ("--data", f"{d}={texts / f'{d}.txt'}")]
    cmd = [sys.executable, "-c", "from moekit.cli.app import main; main()", "profile",
           str(model), *data, "--data-range", "0:0.5", "--seq-len", str(SEQ_LEN), "--max-tokens",
           str(max_tokens), "--out", str(out), "--no-plots"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def losses(model: Path, texts: Path, max_tokens: int) -> dict[str, float]:
    """Mean loss per domain on the second half of every text (the evaluation split)."""
    from moekit.calib.data import DataSource
    from moekit.calib.spec import DataSpec
    from moekit.ops.evaluate import evaluate
    from moekit.runtime.options import RunOptions

    sources = tuple(DataSource(d, texts / f"{d}.txt") for d in DOMAINS)
    data = DataSpec(sources, (0.5, 1.0), seq_len=SEQ_LEN, max_tokens=max_tokens)
    result = evaluate(model, data, run=RunOptions(device="cpu"), batch_size=8)
    return {row.name: row.loss for row in result.domains}


def prune_with_data(model: Path, texts: Path, out: Path, ratio: float,
                    extra: list[str]) -> tuple[float, float]:
    """`moekit prune --data` (first halves) in its own process: (wall s, peak RSS GiB)."""
    data = [arg for d in DOMAINS for arg in ("--data", f"{d}={texts / f'{d}.txt'}")]
    code = ("import resource, sys\nfrom moekit.cli.app import main\ntry:\n    main()\n"
            "finally:\n    print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            " file=sys.stderr)")
    cmd = [sys.executable, "-c", code, "prune", str(model), *data, "--data-range", "0:0.5",
           "--ratio", str(ratio), "--out", str(out), "--overwrite", "--device", "cpu",
           "--seq-len", str(SEQ_LEN), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - start
    peak = next(int(line.split()[1]) for line in done.stderr.splitlines()
                if line.startswith("PEAK_KB"))
    mode = next((line for line in done.stderr.splitlines()
                 if line.startswith(("in memory", "streamed layer by layer"))), "")
    print(f"  runtime: {mode}", flush=True)
    return wall, peak / 2**20


def prune(model: Path, stats: Path, out: Path, criterion: str, ratio: float, seed: int) -> None:
    from moekit.families.fingerprint import model_fingerprint
    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint
    from moekit.ops.prune import prune_checkpoint
    from moekit.ops.prune.select import build_plan
    from moekit.stats.expert_stats import check_stats, load_stats

    checkpoint = Checkpoint(model)
    layout = describe(checkpoint)
    fingerprint = model_fingerprint(checkpoint, layout)
    from moekit.stats.criteria import super_experts

    data = load_stats(stats)
    check_stats(data, layout, fingerprint)
    protect = super_experts(data) if criterion.endswith("+super") else {}
    plan = build_plan(layout, fingerprint, criterion=criterion.removesuffix("+super"),
                      ratio=ratio, stats=data, seed=seed, protect=protect)
    prune_checkpoint(model, plan, out, overwrite=True)


def main() -> None:
    global RATIOS, ONLY_NEW, DOMAINS, SEEDS, SEQ_LEN, DATA_METHODS, JSON
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--max-tokens", type=int, default=16384,
                        help="tokens per domain for evaluation")
    parser.add_argument("--profile-tokens", type=int, default=100_000,
                        help="tokens per domain for the profile")
    parser.add_argument("--keep", type=Path, help="keep the profile and pruned models here")
    parser.add_argument("--only-new", action="store_true",
                        help="skip the rows of the original criteria and random baselines")
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--no-random", action="store_true", help="skip the random baselines")
    parser.add_argument("--methods", help="comma-separated data methods to run (default: "
                        f"{','.join(DEFAULT_DATA)}; also {','.join(DATA_METHODS)})")
    parser.add_argument("--max-memory", help="pass --max-memory to `prune --data` (e.g. a "
                        "budget below the model's size, to run it streamed layer by layer)")
    parser.add_argument("--model", type=Path, help="another model (e.g. from "
                        "train_small_moe.py); its texts: --texts")
    parser.add_argument("--texts", type=Path, help="folder of .txt domains (default: the "
                        "fixture texts; sample_data/ for --model)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per window "
                        "(profile, --data, eval); at most the length the model was trained on")
    parser.add_argument("--data-methods", default=",".join(DEFAULT_DATA),
                        help="which `prune --data` rows to run (comma list; '' for none)")
    parser.add_argument("--json", type=Path, help="also write the mean losses here")
    args = parser.parse_args()
    RATIOS = tuple(float(r) for r in args.ratios.split(","))
    SEQ_LEN, JSON = args.seq_len, args.json
    if not args.methods:
        DATA_METHODS = {k: v for k, v in DATA_METHODS.items()
                        if k in args.data_methods.split(",")}
    ONLY_NEW = args.only_new
    SEEDS = () if args.no_random else SEEDS
    if args.methods:
        DATA_METHODS = {k: v for k, v in DATA_METHODS.items() if k in args.methods.split(",")}
    if args.max_memory:
        for extra in DATA_METHODS.values():
            extra += ["--max-memory", args.max_memory]
    model = args.model or args.fixtures / "models" / "mixtral-e16k2"
    texts = args.texts or (ROOT / "sample_data" if args.model else args.fixtures / "text")
    DOMAINS = tuple(sorted(p.stem for p in texts.glob("*.txt")))
    if not model.exists():
        sys.exit(f"fixture {model} not found (pass --fixtures)")
    work = args.keep or Path(tempfile.mkdtemp(prefix="moekit-bench-quality-"))
    try:
        run(model, texts, work, args.max_tokens, args.profile_tokens)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def run(model: Path, texts: Path, work: Path, max_tokens: int, profile_tokens: int) -> None:
    start = time.perf_counter()
    stats = work / "profile"
    if not (stats / "metadata.json").exists():
        profile(model, texts, stats, profile_tokens)
    print(f"profiled in {time.perf_counter() - start:.0f} s", flush=True)
    rows: dict[tuple[str, str], dict[str, float]] = {("0", "unpruned"): losses(model, texts,
                                                                               max_tokens)}
    costs: dict[tuple[str, str], tuple[float, float]] = {}
    old = ([] if ONLY_NEW else [(c, 0) for c in CRITERIA]) + [("random", s) for s in SEEDS]
    for ratio in RATIOS:
        for name, extra in DATA_METHODS.items():
            out = work / f"{name}-{ratio}"
            costs[(f"{ratio:.0%}", name)] = prune_with_data(model, texts, out, ratio, extra)
            rows[(f"{ratio:.0%}", name)] = losses(out, texts, max_tokens)
            mean = statistics.mean(rows[(f"{ratio:.0%}", name)].values())
            wall, peak = costs[(f"{ratio:.0%}", name)]
            print(f"{ratio:.0%} {name}: mean {mean:.4f} (prune {wall:.0f} s, {peak:.2f} GiB)",
                  flush=True)
        for criterion, seed in old + [(c, 0) for c in NEW_STATS]:
            out = work / f"{criterion}-{seed}-{ratio}"
            prune(model, stats, out, criterion, ratio, seed)
            name = criterion if criterion != "random" else f"random (seed {seed})"
            rows[(f"{ratio:.0%}", name)] = losses(out, texts, max_tokens)
            mean = statistics.mean(rows[(f"{ratio:.0%}", name)].values())
            print(f"{ratio:.0%} {name}: mean {mean:.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    report(rows, costs, max_tokens, profile_tokens)


def report(rows: dict[tuple[str, str], dict[str, float]],
           costs: dict[tuple[str, str], tuple[float, float]], max_tokens: int,
           profile_tokens: int) -> None:
    print(f"\n## Pruning: eval loss (nats), second half of each "
          f"text, <= {max_tokens} tokens per domain; profile on the first half (<= "
          f"{profile_tokens} tokens per domain)\n")
    print("| removed | criterion | " + " | ".join(DOMAINS) + " | mean | vs unpruned | prune wall "
          "| peak RSS |")
    print("|---" * (len(DOMAINS) + 6) + "|")
    means = {key: statistics.mean(values.values()) for key, values in rows.items()}
    base = means[("0", "unpruned")]
    if JSON is not None:
        JSON.write_text(json.dumps([{"removed": k[0], "method": k[1], "mean": means[k],
                                     "domains": rows[k], "prune_s": costs.get(k, [None])[0]}
                                    for k in rows], indent=1))
    for key, values in rows.items():
        wall, peak = costs.get(key, (math.nan, math.nan))
        cells = [f"{values[d]:.4f}" for d in DOMAINS] + [f"**{means[key]:.4f}**",
                                                          f"+{means[key] - base:.4f}",
                                                          f"{wall:.0f} s", f"{peak:.2f} GiB"]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    print()
    if ONLY_NEW or not SEEDS:
        return
    for ratio in (f"{r:.0%}" for r in RATIOS):
        random_mean = statistics.mean(means[(ratio, f"random (seed {s})")] for s in SEEDS)
        ranked = sorted((c for c in CRITERIA + NEW_STATS if (ratio, c) in means),
                        key=lambda c: means[(ratio, c)])
        print(f"- {ratio}: stats criteria best first: "
              + ", ".join(f"{c} +{means[(ratio, c)] - base:.4f}" for c in ranked))
        best = min(CRITERIA, key=lambda c: means[(ratio, c)])
        worst = max(CRITERIA, key=lambda c: means[(ratio, c)])
        print(f"- {ratio}: random mean {random_mean:.4f}; best {best} {means[(ratio, best)]:.4f} "
              f"(+{means[(ratio, best)] - base:.4f} vs unpruned {base:.4f}); worst criterion "
              f"{worst} {means[(ratio, worst)]:.4f}, {random_mean - means[(ratio, worst)]:.4f} "
              "below random")


if __name__ == "__main__":
    main()
