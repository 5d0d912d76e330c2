#!/usr/bin/env python3
"""Ablation importance on the mixtral-e16k2 fixture: agreement with removing the expert, and cost.

1. Ablation (`moekit.ops.ablation`, exact + first-order) on the first `--tokens` tokens of the
   calibration half (`0:0.5`) of the five fixture texts, one window per batch so that the
   spread over windows gives a standard error (SE) per (layer, expert).
2. For a handful of (layer, expert) pairs (per layer the most important expert, plus the median
   expert of two layers), an independent number: a copy of the model whose MoE block
   transformers rebuilt with 15 experts (tests/ablation_support.py; `moekit prune --drop` cannot
   write a checkpoint with one expert fewer in only one of four MoE layers: one expert count per
   model), on (a) the same tokens (should agree to float error) and (b) as many held-out tokens
   from the other half `0.5:1` (should agree within ~2 SE: sampling noise).
3. `moekit prune --drop` (the least important expert of every layer, by ablation) + `moekit
   eval --ref` on the same tokens: the joint loss change beside the sum of the four single-layer
   ablations (how additive removals are).
4. Cost: plain forward, exact ablation and first-order ablation over the same batches,
   repetitions interleaved, medians; ratios to the plain forward.

    .venv/bin/python benchmarks/bench_ablation.py --threads 1 --tokens 5120 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
FIXTURES = ROOT.parent / "shared" / "fixtures"

from ablation_support import nll_and_kl, remove_expert  # noqa: E402

from moekit.calib.data import DataSource, load_domains  # noqa: E402
from moekit.families.layout import describe  # noqa: E402
from moekit.io.reader import Checkpoint  # noqa: E402
from moekit.ops.ablation.run import ablate, sample_batches  # noqa: E402


def per_window(model, layout, work, names) -> dict[str, np.ndarray]:
    """Per window w: mean dNLL / KL / first-order [W, L, E] and token counts [W]."""
    out: dict[str, list] = {"loss": [], "kl": [], "fo": [], "tokens": []}
    for item in work:
        sums = ablate(model, layout, [item], names)
        tokens = int(sums.tokens.sum())
        out["tokens"].append(tokens)
        for key, attr in (("loss", "loss"), ("kl", "kl"), ("fo", "first_order")):
            values = getattr(sums, attr)
            out[key].append(np.stack([values[i].sum(1) for i in sums.layers]) / tokens)
    return {k: np.asarray(v) for k, v in out.items()}


def weighted(values: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token-weighted mean over windows and its standard error (between-window spread)."""
    w = tokens / tokens.sum()
    mean = np.tensordot(w, values, axes=1)
    var = np.tensordot(w, (values - mean) ** 2, axes=1) / max(1, len(tokens) - 1)
    return mean, np.sqrt(var)


def independent(model, family, pairs, work) -> dict[tuple[int, int], tuple[float, float]]:
    """Mean dNLL and KL of the rebuilt model without expert e in layer l, over `work`."""
    base = sum(nll_and_kl(model, model, ids)[0] for _, ids in work)
    tokens = sum(int(ids[:, 1:].numel()) for _, ids in work)
    out = {}
    for layer, expert in pairs:
        pruned = remove_expert(model, family, layer, expert)
        nll = kl = 0.0
        for _, ids in work:
            a, b = nll_and_kl(pruned, model, ids)
            nll, kl = nll + a, kl + b
        out[(layer, expert)] = ((nll - base) / tokens, kl / tokens)
    return out


def joint_prune_eval(path: Path, drops: dict[int, int], args, folder: Path) -> dict:
    """`moekit prune --drop` one expert per layer, then `moekit eval --ref` on the sample."""
    listing = folder / "drop.txt"
    listing.write_text("".join(f"{layer}: {expert}\n" for layer, expert in drops.items()))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    moekit = [sys.executable, "-m", "moekit"]
    subprocess.run([*moekit, "prune", str(path), "--drop", str(listing), "--out",
                    str(folder / "pruned")], check=True, env=env, capture_output=True)
    share = -(-args.tokens // 5)
    data = sum((["--data", f"{p.stem}={p}"] for p in texts(args)), [])
    out = subprocess.run([*moekit, "eval", str(folder / "pruned"), "--ref", str(path), *data,
                          "--data-range", "0:0.5", "--seq-len", str(args.seq_len),
                          "--max-tokens", str(share), "--dtype", "float32", "--device", "cpu",
                          "--json"], check=True, env=env, capture_output=True, text=True)
    overall = json.loads(out.stdout[out.stdout.index("{"):])["overall"]
    return {"tokens": overall["tokens"], "loss_change": overall["loss"] - overall["ref_loss"],
            "kl": overall["kl"]}


def texts(args) -> list[Path]:
    return sorted(Path(args.texts).glob("*.txt"))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def costs(model, layout, work, names, reps: int) -> dict[str, float]:
    """Median seconds of plain forward / exact / first-order over `work`, interleaved."""
    def plain() -> None:
        with torch.inference_mode():
            for _, ids in work:
                model(input_ids=ids, use_cache=False)

    runs = {"plain": plain,
            "exact": lambda: ablate(model, layout, work, names, first_order=False),
            "first_order": lambda: ablate(model, layout, work, names, exact=False)}
    plain()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for key, fn in runs.items():
            times[key].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(FIXTURES / "models" / "mixtral-e16k2"))
    parser.add_argument("--texts", default=str(FIXTURES / "text"))
    parser.add_argument("--tokens", type=int, default=5120)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from moekit.runtime.loading import load_tokenizer, quiet_transformers

    quiet_transformers()
    path = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layout = describe(Checkpoint(path))
    tok = load_tokenizer(path)
    sources = [DataSource(p.stem, p) for p in texts(args)]
    names = [s.name for s in sources]
    share = -(-args.tokens // len(sources))

    def sample(fraction: tuple[float, float]) -> list:
        domains = load_domains(sources, tok, seq_len=args.seq_len, max_tokens=share,
                               fraction=fraction)
        return sample_batches(domains, args.tokens, 1)

    calib, held = sample((0.0, 0.5)), sample((0.5, 1.0))
    windows = per_window(model, layout, calib, names)
    loss, loss_se = weighted(windows["loss"], windows["tokens"])
    kl, _ = weighted(windows["kl"], windows["tokens"])
    fo, _ = weighted(windows["fo"], windows["tokens"])
    layers = [layer.index for layer in layout.moe_layers]
    pairs = [(layers[i], int(np.argmax(loss[i]))) for i in range(len(layers))]
    pairs += [(layers[i], int(np.argsort(loss[i])[len(loss[i]) // 2])) for i in (1, 3)]
    same = independent(model, layout.family, pairs, calib)
    other = independent(model, layout.family, pairs, held)
    rows = []
    for layer, expert in pairs:
        i = layers.index(layer)
        rows.append({"layer": layer, "expert": expert, "ablation_loss": loss[i, expert],
                     "se": loss_se[i, expert], "removed_same": same[(layer, expert)][0],
                     "ablation_kl": kl[i, expert], "removed_kl_same": same[(layer, expert)][1],
                     "removed_heldout": other[(layer, expert)][0],
                     "first_order": fo[i, expert]})
    drops = {layers[i]: int(np.argmin(loss[i])) for i in range(len(layers))}
    with tempfile.TemporaryDirectory() as folder:
        joint = joint_prune_eval(path, drops, args, Path(folder))
    joint["sum_of_single"] = float(sum(loss[layers.index(i), e] for i, e in drops.items()))
    timing = costs(model, layout, calib, names, args.reps)
    report(args, rows, loss, fo, joint, drops, timing, int(windows["tokens"].sum()))


def report(args, rows, loss, fo, joint, drops, timing, tokens: int) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    print(f"sample: {tokens} predicted tokens in {args.tokens // args.seq_len} windows of "
          f"{args.seq_len}; threads {args.threads}")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    flat_loss, flat_fo = loss.reshape(-1), fo.reshape(-1)
    pearson = float(np.corrcoef(flat_loss, flat_fo)[0, 1])
    spearman = float(pd.Series(flat_loss).corr(pd.Series(flat_fo), method="spearman"))
    print(f"first-order vs exact over all {flat_loss.size} (layer, expert): Pearson "
          f"{pearson:.3f}, Spearman {spearman:.3f}")
    print(f"prune --drop {drops} + eval: loss change {joint['loss_change']:.5f}, KL "
          f"{joint['kl']:.5f} on {joint['tokens']} tokens; sum of the single-layer ablations "
          f"{joint['sum_of_single']:.5f}")
    ratios = {k: v / timing["plain"] for k, v in timing.items()}
    print("seconds (median): " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))
    print("cost vs one plain forward: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "pairs": rows, "first_order_pearson": pearson, "first_order_spearman": spearman,
            "joint": joint, "drops": drops, "seconds": timing, "ratios": ratios,
            "tokens": tokens}, indent=2, default=float))


if __name__ == "__main__":
    main()
