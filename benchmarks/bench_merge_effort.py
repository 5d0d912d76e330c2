#!/usr/bin/env python3
"""Cost of `moekit merge --effort E` in plain forward passes, per stage, with quality.

For each effort level, one child process runs `moekit merge MODEL --data <texts> --data-range
0:0.5 --ratio R --effort E` (the default grouping and method: `m-smoe`, `fit-layer`; no
`--stats`, so the statistics pass is counted) in-process with the library's stages wrapped by
timers (exclusive wall and CPU seconds, `bench_effort.Clock`): load (model and tokens),
statistics (the `profile` pass), capture (the grouping sample's and the refit lanes'
captures), grouping, replay (the merged layer's routing replay), refit (the down refit), lanes
(the rest of the layered run: the lanes' forwards and held-out scoring), write. The unit is one
plain forward (no hooks) through the same engine over the measured run's fit windows, scaled
to the statistics' N positions (the calibration tokens of every level; time is linear in the
windows). Then `moekit eval OUT --data <texts> --data-range 0.5:1` gives the held-out loss.
Rows: the work's wall and CPU time (from the model's first opening to the written folder, minus
the unit's own forward; the imports are warmed first, start-up) divided by the unit, per stage,
peak RSS, the estimate printed as the measured run starts (`ops/merge/estimate.py`) against the
wall time after it (the work less load, statistics and probe), and the loss increase over the
unmerged model.

    OMP_NUM_THREADS=1 python benchmarks/bench_merge_effort.py --efforts fast default best \\
        --ratio 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_effort import (
    FIXTURES,
    Clock,
    _cli,
    _data_args,
    _plain_forward,
    _start_up,
    evaluate,
    run_child,
)

STAGES = ("load", "statistics", "probe", "capture", "grouping", "replay", "refit", "lanes", "write")


def _instrument(clock: Clock, found: dict[str, Any]) -> None:
    """Wrap the stages where the merge looks them up (module attributes)."""
    import moekit.ops.merge
    from moekit.layerfit import lanes, measured
    from moekit.ops.merge import autostats, grouping, onepass, refit, run

    def load(*args: Any, **kwargs: Any) -> Any:
        cal = original_load(*args, **kwargs)
        found["unit"] = _plain_forward(cal, clock)
        return cal

    def estimate(*args: Any, **kwargs: Any) -> Any:
        result = original_estimate(*args, **kwargs)
        found["estimate"] = {"seconds": result.seconds, "peak_bytes": result.peak_bytes,
                             "stages": result.stages}
        return result

    original_estimate = run.estimate_refit
    run.estimate_refit = clock.wrap("probe", estimate)
    original_load = refit.load_calibration
    refit.load_calibration = clock.wrap("load", load)
    autostats.profile_model = clock.wrap("statistics", autostats.profile_model)
    lanes.capture_step = clock.wrap("capture", lanes.capture_step)
    onepass.capture_step = clock.wrap("capture", onepass.capture_step)
    grouping.Grouper.layer = clock.wrap("grouping", grouping.Grouper.layer)
    measured.build_replay = clock.wrap("replay", measured.build_replay)
    measured.refit_layer = clock.wrap("refit", measured.refit_layer)
    lanes.fit_from_chunks = clock.wrap("refit", lanes.fit_from_chunks)
    lanes.LaneRun.run = clock.wrap("lanes", lanes.LaneRun.run)
    moekit.ops.merge.merge_checkpoint = clock.wrap("write", moekit.ops.merge.merge_checkpoint)


def child(args: argparse.Namespace) -> None:
    """One merge at args.effort and its eval; prints JSON."""
    _start_up(args.model)
    clock = Clock()
    clock.wall, clock.cpu = dict.fromkeys(STAGES, 0.0), dict.fromkeys(STAGES, 0.0)
    found: dict[str, Any] = {}
    _instrument(clock, found)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        plan = Path(tmp) / "plan.json"
        wall, cpu = time.perf_counter(), time.process_time()
        _cli(["merge", str(args.model), *_data_args(args.text), "--data-range", "0:0.5",
              "--ratio", str(args.ratio), "--seq-len", str(args.seq_len), "--out", str(out),
              "--effort", args.effort, "--plan-out", str(plan), *args.args.split()])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        calibration = json.loads(plan.read_text()).get("calibration") or {}
        provenance = json.loads((out / "moekit_provenance.json").read_text())
        loss = evaluate(out, args) if args.eval else float("nan")
    stats = calibration.get("stats_tokens") or calibration.get("max_tokens")
    unit = found.get("unit")
    if unit and stats:  # scaled to the statistics' positions
        scale = stats / unit["positions"]
        unit = {**unit, "wall": unit["wall"] * scale, "cpu": unit["cpu"] * scale,
                "measured": unit["positions"], "positions": stats}
    print("RESULT " + json.dumps({
        "name": args.effort, "process_wall": wall, "process_cpu": cpu,
        "work_wall": sum(clock.wall.values()), "work_cpu": sum(clock.cpu.values()),
        "stages_wall": clock.wall, "stages_cpu": clock.cpu, "unit": unit,
        "refit_tokens": calibration.get("refit_tokens"), "estimate": found.get("estimate"),
        "peak_rss": peak, "loss": loss,
        "kl": _refit_kl(provenance)}), flush=True)


def _refit_kl(provenance: dict[str, Any]) -> Any:
    """The held-out KLs (centres, refitted) the merge decided on, if recorded."""
    text = json.dumps(provenance)
    start = text.find('"kl_held_out"')
    if start < 0:
        return None
    return json.loads(text[text.index("{", start):text.index("}", start) + 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=FIXTURES / "models" / "mixtral-e16k2")
    parser.add_argument("--text", type=Path, default=FIXTURES / "text")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--efforts", nargs="*", default=["fast", "default", "best"])
    parser.add_argument("--effort", help=argparse.SUPPRESS)
    parser.add_argument("--args", default="", help="more merge options for every row")
    parser.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate the outputs (--no-eval: cost only)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.effort:
        child(args)
        return
    base = evaluate(args.model, args) if args.eval else float("nan")
    print(f"unmerged loss {base:.4f} (load average {os.getloadavg()[0]:.2f})", flush=True)
    rows = [_run_child(args, e) for e in args.efforts]
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"unmerged": base, "rows": rows}, indent=1))
    print_table(rows, base)


def _run_child(args: argparse.Namespace, effort: str) -> dict[str, Any]:
    return run_child(Path(__file__), args, ["--effort", effort], effort)


def print_table(rows: list[dict[str, Any]], base: float) -> None:
    """Markdown: x forward (wall, CPU) of the work and per stage, RSS, loss."""
    print("\n| effort | positions (stats / measured / refit) | x forward wall / CPU | wall / CPU s "
          "| estimate / measured s | peak RSS (est.) | loss (+ over unmerged) "
          "| stages, x forward (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        unit = r["unit"] or {"wall": float("nan"), "cpu": float("nan"), "positions": 0}
        stages = ", ".join(f"{k} {v / unit['cpu']:.1f}" for k, v in r["stages_cpu"].items()
                           if v > 0.05 * unit["cpu"])
        positions = f"{unit['positions']} / {unit.get('measured', unit['positions'])} / " \
            f"{r['refit_tokens'] or '-'}"
        est = r.get("estimate") or {"seconds": float("nan"), "peak_bytes": float("nan")}
        done = ("load", "statistics", "probe")
        after = r["work_wall"] - sum(r["stages_wall"].get(k, 0.0) for k in done)
        print(f"| {r['name']} | {positions} | {r['work_wall'] / unit['wall']:.1f} / "
              f"{r['work_cpu'] / unit['cpu']:.1f} | {r['work_wall']:.0f} / {r['work_cpu']:.0f} "
              f"| {est['seconds']:.0f} / {after:.0f} | {r['peak_rss'] / 1e9:.2f} GB "
              f"({est['peak_bytes'] / 1e9:.2f}) | {r['loss']:.4f} ({r['loss'] - base:+.4f}) "
              f"| {stages} |")


if __name__ == "__main__":
    main()
