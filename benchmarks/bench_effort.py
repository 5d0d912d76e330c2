#!/usr/bin/env python3
"""Cost of `moekit prune --data --effort E` in plain forward passes, per stage, with quality.

For each effort level, one child process runs `moekit prune MODEL --data <texts> --data-range
0:0.5 --ratio R --effort E` in-process with the library's stages wrapped by timers (exclusive
wall and CPU seconds: load, probe, statistics, capture, search, refit, reconstruction, the rest
of the layered run, write), and measures in the same process, on the same engine and device, one
plain forward (no hooks) over the run's own selection windows: the unit. Then
`moekit eval OUT --data <texts> --data-range 0.5:1 --seq-len SEQ --max-tokens EVT` gives the
held-out loss. Rows: wall and CPU time of the prune (start-up excluded: torch, pandas and
the family's transformers module are imported first; from the model's opening to the written
folder, minus the unit's own forward) divided by the unit, per stage,
peak RSS of the process, the estimate printed before the work, and the loss increase over the
unpruned model. `--stats ean` adds the stats-only row (`--criterion ean` on statistics of the
same tokens).

    OMP_NUM_THREADS=1 python benchmarks/bench_effort.py --efforts fast default --stats ean
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DOMAINS = ("code_py", "de", "en_bible", "en_docs", "fr")
STAGES = ("load", "probe", "statistics", "capture", "search", "refit", "reconstruction",
          "lanes", "write")


class Clock:
    """Exclusive wall and CPU seconds per stage (time inside a nested stage counts there)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.cpu: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.stack: list[list[float]] = []

    def wrap(self, stage: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [time.perf_counter(), time.process_time(), 0.0, 0.0]
            self.stack.append(frame)
            try:
                return func(*args, **kwargs)
            finally:
                self.stack.pop()
                wall = time.perf_counter() - frame[0]
                cpu = time.process_time() - frame[1]
                self.wall[stage] += wall - frame[2]
                self.cpu[stage] += cpu - frame[3]
                if self.stack:
                    self.stack[-1][2] += wall
                    self.stack[-1][3] += cpu
        return timed

    def exclude(self, wall: float, cpu: float) -> None:
        """Time spent inside the current stage that belongs to no stage (the unit forward)."""
        if self.stack:
            self.stack[-1][2] += wall
            self.stack[-1][3] += cpu


def _instrument(clock: Clock, found: dict[str, Any]) -> None:
    """Wrap the stages where the prune looks them up (module attributes)."""
    import moekit.ops.prune
    from moekit.layerfit import lanes, measured
    from moekit.ops.prune import calibrated

    def load(*args: Any, **kwargs: Any) -> Any:
        cal = measured.load_calibration(*args, **kwargs)
        found["unit"] = _plain_forward(cal, clock)
        return cal

    def estimate(*args: Any, **kwargs: Any) -> Any:
        result = original_estimate(*args, **kwargs)
        found["estimate"] = {"seconds": result.seconds, "peak_bytes": result.peak_bytes,
                             "stages": result.stages}
        return result

    original_estimate = calibrated._estimate
    calibrated.load_calibration = clock.wrap("load", load)
    calibrated._estimate = estimate
    calibrated.probe = clock.wrap("probe", calibrated.probe)
    calibrated.calibration_stats = clock.wrap("statistics", calibrated.calibration_stats)
    lanes.capture_step = clock.wrap("capture", lanes.capture_step)
    measured.build_replay = clock.wrap("search", measured.build_replay)
    measured.search_drop = clock.wrap("search", measured.search_drop)
    measured.refit_layer = clock.wrap("refit", measured.refit_layer)
    lanes.fit_from_chunks = clock.wrap("refit", lanes.fit_from_chunks)
    measured.reconstruct_layer = clock.wrap("reconstruction", measured.reconstruct_layer)
    lanes.LaneRun.run = clock.wrap("lanes", lanes.LaneRun.run)
    moekit.ops.prune.prune_checkpoint = clock.wrap("write", moekit.ops.prune.prune_checkpoint)


def _plain_forward(cal: Any, clock: Clock) -> dict[str, float]:
    """One forward of the selection's windows through the engine, no hooks (the unit)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in cal.engine.run(cal.fit):
        pass
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    clock.exclude(wall, cpu)
    return {"wall": wall, "cpu": cpu, "positions": sum(int(w.numel()) for w in cal.fit)}


def _data_args(text: Path) -> list[str]:
    return [x for d in DOMAINS for x in ("--data", f"{d}={text / f'{d}.txt'}")]


def _cli(argv: list[str]) -> None:
    from moekit.cli.app import main as cli

    sys.argv = ["moekit", *argv]
    try:
        cli()
    except SystemExit as exc:
        if exc.code:
            raise


def _start_up(model: Path) -> None:
    """Import what any run imports first (torch, the family's transformers module, pandas for
    the profile): ~5 s CPU here, start-up rather than work (it would land in the first stage)."""
    import importlib

    import pandas  # noqa: F401
    import torch  # noqa: F401

    kind = json.loads((model / "config.json").read_text())["model_type"]
    importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")


def child(args: argparse.Namespace) -> None:
    """One prune (args.effort, or the stats criterion args.criterion) and its eval; prints JSON."""
    _start_up(args.model)
    clock, found = Clock(), {}
    _instrument(clock, found)
    extra = ["--criterion", args.criterion] if args.criterion else ["--effort", args.effort]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        wall, cpu = time.perf_counter(), time.process_time()
        _cli(["prune", str(args.model), *_data_args(args.text), "--data-range", "0:0.5",
              "--ratio", str(args.ratio), "--seq-len", str(args.seq_len), "--out", str(out),
              *extra, *args.args.split()])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        loss = evaluate(out, args) if args.eval else float("nan")
    work_wall = sum(clock.wall.values())
    work_cpu = sum(clock.cpu.values())
    print("RESULT " + json.dumps({
        "name": args.criterion or args.effort, "process_wall": wall, "process_cpu": cpu,
        "work_wall": work_wall, "work_cpu": work_cpu, "stages_wall": clock.wall,
        "stages_cpu": clock.cpu, "unit": found.get("unit"), "estimate": found.get("estimate"),
        "peak_rss": peak, "loss": loss}), flush=True)


def evaluate(model: Path, args: argparse.Namespace) -> float:
    """Mean held-out loss (the `overall` row) of `model` on 0.5:1 of the texts."""
    code = "import sys; from moekit.cli.app import main; sys.argv = sys.argv[1:]; main()"
    out = subprocess.run([sys.executable, "-c", code, "moekit", "eval", str(model),
                          *_data_args(args.text), "--data-range", "0.5:1", "--seq-len",
                          str(args.seq_len), "--max-tokens", str(args.eval_tokens), "--json"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    data = json.loads(out.stdout)
    return float(data["overall"]["loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=FIXTURES / "models" / "mixtral-e16k2")
    parser.add_argument("--text", type=Path, default=FIXTURES / "text")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--efforts", nargs="*", default=["fast", "default"])
    parser.add_argument("--stats", nargs="*", default=[], help="stats criteria rows")
    parser.add_argument("--effort", help=argparse.SUPPRESS)
    parser.add_argument("--criterion", help=argparse.SUPPRESS)
    parser.add_argument("--args", default="", help="more prune options for every row, e.g. "
                        "'--dtype float32'")
    parser.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate the outputs (--no-eval: cost only, e.g. random weights)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.effort or args.criterion:
        child(args)
        return
    base = evaluate(args.model, args) if args.eval else float("nan")
    print(f"unpruned loss {base:.4f} (load average {os.getloadavg()[0]:.2f})", flush=True)
    rows = [_run_child(args, "--effort", e) for e in args.efforts]
    rows += [_run_child(args, "--criterion", c) for c in args.stats]
    if args.json:
        args.json.write_text(json.dumps({"unpruned": base, "rows": rows}, indent=1))
    print_table(rows, base)


def _run_child(args: argparse.Namespace, flag: str, value: str) -> dict[str, Any]:
    return run_child(Path(__file__), args, [flag, value], value)


def run_child(script: Path, args: argparse.Namespace, extra: list[str],
              label: str) -> dict[str, Any]:
    """Run `script` as a child with the shared options and `extra`; its RESULT row."""
    cmd = [sys.executable, str(script), "--model", str(args.model), "--text", str(args.text),
           "--ratio", str(args.ratio), "--seq-len", str(args.seq_len), "--eval-tokens",
           str(args.eval_tokens), "--args=" + args.args, "--eval" if args.eval else "--no-eval",
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    sys.stderr.write(proc.stderr[-3000:])
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{label}: no result ({proc.returncode})\n{proc.stdout[-2000:]}")
    row = json.loads(line[7:])
    print(json.dumps(row), flush=True)
    return row


def print_table(rows: list[dict[str, Any]], base: float) -> None:
    """Markdown: x forward (wall, CPU) of the work and per stage, estimate, RSS, loss."""
    print("\n| run | positions | x forward wall / CPU | wall / CPU s | estimate / measured s "
          "| peak RSS (est.) | loss (+ over unpruned) | stages, x forward (wall) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        unit = r["unit"] or {"wall": float("nan"), "cpu": float("nan"), "positions": 0}
        stages = ", ".join(f"{k} {v / unit['wall']:.1f}" for k, v in r["stages_wall"].items()
                           if v > 0.01 * unit["wall"])
        est = r["estimate"] or {"seconds": float("nan"), "peak_bytes": float("nan")}
        after = r["work_wall"] - r["stages_wall"]["load"] - r["stages_wall"]["probe"]
        print(f"| {r['name']} | {unit['positions']} | {r['work_wall'] / unit['wall']:.1f} / "
              f"{r['work_cpu'] / unit['cpu']:.1f} | {r['work_wall']:.0f} / {r['work_cpu']:.0f} "
              f"| {est['seconds']:.0f} / {after:.0f} | {r['peak_rss'] / 1e9:.2f} GB "
              f"({est['peak_bytes'] / 1e9:.2f}) | {r['loss']:.4f} "
              f"({r['loss'] - base:+.4f}) | {stages} |")


if __name__ == "__main__":
    main()
