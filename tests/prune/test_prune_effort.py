"""`prune --data --effort`: the levels resolve to their documented settings and explicit options
override them; `best` is the settings before the levels (same written tensors as those set by
hand); the estimate comes from a probe, is positive, and `--dry-run` prints it without the work."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.calib.data import DataSource
from moekit.calib.spec import DataSpec
from moekit.cli.app import app
from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.ops.prune import effort as effort_mod
from moekit.ops.prune.calibrated import DataOptions, choose_with_data, estimate_run
from moekit.ops.prune.effort import EFFORTS, apply_effort, effort_settings
from moekit.runtime.options import RunOptions

RUNNER = CliRunner()


def _layout(tiny_checkpoint) -> object:
    return describe(Checkpoint(tiny_checkpoint("mixtral")))


def _options(**kw) -> DataOptions:
    return DataOptions(DataSpec((DataSource("doc", Path("unused.txt")),)), **kw)


def test_levels_resolve_to_their_documented_settings(tiny_checkpoint):
    layout = _layout(tiny_checkpoint)
    best = effort_settings("best", layout, 2)
    assert (best.max_tokens, best.beam, best.refit_auto, best.compensate,
            best.reconstruct_steps, best.reconstruct_forwards, best.reconstruct_progress) == \
        (None, 4, True, None, 1000, None, 0.0)
    default = effort_settings("default", layout, 2)
    assert default.beam == 2 and not default.refit_auto and default.compensate is None
    assert default.reconstruct_forwards == effort_mod.RECONSTRUCT_FORWARDS
    assert default.reconstruct_progress == effort_mod.PROGRESS
    assert default.max_tokens == effort_mod.search_positions(layout, 2)
    fast = effort_settings("fast", layout, 2)
    assert (fast.beam, fast.refit_auto, fast.compensate, fast.reconstruct_steps,
            fast.selection, fast.refit_share) == (1, False, True, 0, "ean", 0.25)
    assert fast.max_tokens == effort_mod.refit_positions(layout, 2)
    for name in EFFORTS:
        found = effort_settings(name, layout, 2).max_tokens
        assert found is None or (2048 <= found <= 32768 and found % 1024 == 0)


def test_refit_positions_follow_the_rule():
    class Layout:  # Qwen3-30B-A3B's shape: 128 experts of width 768, top-8
        config = {"hidden_size": 2048, "moe_intermediate_size": 768}
        moe_layers = [type("L", (), {"num_experts": 128})()]
        family = type("F", (), {"keys": type("K", (), {"expert_width": (
            "moe_intermediate_size",)})()})()

        def top_k(self) -> int:
            return 8

    # 20 * 768 * 64 / (8 * 0.75) = 163840 -> capped at 32768
    assert effort_mod.refit_positions(Layout(), 64) == 32768
    # the fixture (16 experts of width 128, top-2) at 50 %: 20 * 128 * 8 / 1.5 = 13653.3
    Layout.config = {"hidden_size": 256, "moe_intermediate_size": 128}
    Layout.moe_layers = [type("L", (), {"num_experts": 16})()]
    Layout.top_k = lambda self: 2
    assert effort_mod.refit_positions(Layout(), 8) == 14336
    # the search: 4096 routed pairs per expert on average, 4096 * 16 / 2 = 32768
    assert effort_mod.search_positions(Layout(), 8) == 32768
    Layout.moe_layers = [type("L", (), {"num_experts": 8})()]  # Mixtral-8x7B's 8 of width
    Layout.config = {"hidden_size": 4096, "moe_intermediate_size": 14336}  # 14336: the refit
    assert effort_mod.search_positions(Layout(), 4) == 32768
    Layout.config = {"hidden_size": 256, "moe_intermediate_size": 32}  # narrow: the search
    assert effort_mod.search_positions(Layout(), 4) == 4096 * 8 // 2


def test_explicit_options_override_the_level(tiny_checkpoint):
    layout = _layout(tiny_checkpoint)
    options = _options(effort="fast", beam=3, max_tokens=4096, compensate=True,
                       reconstruct_steps=50, refit_auto=True)
    _, options = apply_effort(options, layout, 2)
    assert (options.beam, options.max_tokens, options.compensate,
            options.reconstruct_steps) == (3, 4096, True, 50)
    assert options.reconstruct_forwards is None and options.reconstruct_progress == 0.0
    assert options.refit_auto is False  # fast streams nothing unless --refit-tokens is given
    assert options.selection is None  # a beam or reconstruction asked for: the search runs
    options = _options(effort="fast", beam=None, reconstruct_steps=None)  # as the CLI does
    _, options = apply_effort(options, layout, 2)
    assert (options.selection, options.refit_share, options.compensate) == ("ean", 0.25, True)
    options = _options(effort="default", refit_tokens=8192, refit_auto=False, beam=None,
                       reconstruct_steps=None)  # as the CLI passes options not given
    _, options = apply_effort(options, layout, 2)
    assert options.refit_tokens == 8192 and options.token_default is not None
    assert options.reconstruct_steps == 1000 and options.reconstruct_forwards is not None
    assert options.beam == 2


def test_library_default_is_best(tiny_checkpoint):
    options = _options(refit_auto=True)
    _, options = apply_effort(options, _layout(tiny_checkpoint), 2)
    assert (options.beam, options.reconstruct_steps, options.token_default, options.refit_auto,
            options.compensate, options.reconstruct_forwards) == (4, 1000, None, True, None, None)


def test_unknown_effort_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    result = RUNNER.invoke(app, ["prune", str(tiny_checkpoint("mixtral")), "--data",
                                 f"x={tmp_path / 'missing.txt'}", "--ratio", "0.5",
                                 "--effort", "quick", "--dry-run"])
    assert result.exit_code != 0 and "unknown --effort 'quick'" in result.output


def _data_args(texts: dict[str, Path]) -> list[str]:
    return [x for name, path in texts.items() for x in ("--data", f"{name}={path}")]


def test_dry_run_prints_the_estimate_and_does_no_heavy_work(trained_checkpoint, sample_texts,
                                                            monkeypatch):
    from moekit.layerfit import lanes
    from moekit.ops.prune import calibrated

    def refuse(*args, **kwargs):
        raise AssertionError("the work ran in a dry run")

    monkeypatch.setattr(lanes.LaneRun, "run", refuse)
    monkeypatch.setattr(calibrated, "calibration_stats", refuse)
    folder = trained_checkpoint("moe")
    result = RUNNER.invoke(app, ["prune", str(folder), *_data_args(sample_texts), "--ratio",
                                 "0.5", "--effort", "fast", "--seq-len", "64", "--dry-run",
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout[result.stdout.index("{"):])["estimate"]
    assert found["seconds"] > 0 and found["peak_bytes"] > 0
    assert found["stages"]["lanes"] > 0
    result = RUNNER.invoke(app, ["prune", str(folder), *_data_args(sample_texts), "--ratio",
                                 "0.5", "--seq-len", "64", "--dry-run", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "estimate: about" in result.output and "effort default" in result.output


def test_estimate_comes_from_a_probe_and_bounds_a_measured_run(trained_checkpoint,
                                                               sample_texts):
    """On a tiny model the estimate is positive, built from the probe's measured times, and of
    the order of the measured run (a generous factor: timings on a shared CPU are noisy)."""
    import time

    folder = trained_checkpoint("moe")
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    sources = [DataSource(name, path) for name, path in sample_texts.items()]

    def options() -> DataOptions:
        return DataOptions(DataSpec(tuple(sources), seq_len=64), max_tokens=2048,
                           run=RunOptions(device="cpu", dtype="float32"), effort="default",
                           protect_super=False)

    args = dict(criterion="measured", ratio=0.5, protect={}, min_experts=None,
                log=lambda _: None)
    fingerprint = model_fingerprint(checkpoint, layout)
    found = estimate_run(folder, layout, fingerprint, options=options(), **args)
    assert found.probe is not None and found.probe.forward > 0 and found.probe.select > 0
    assert found.probe.capture > 0 and found.seconds > 0 and found.peak_bytes > 0
    start = time.perf_counter()
    choose_with_data(folder, layout, fingerprint, options=options(), **args)
    measured = time.perf_counter() - start
    assert found.seconds / 50 < measured < 50 * found.seconds + 30


def _tensors(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_best_equals_the_settings_before_the_levels(trained_checkpoint, sample_texts,
                                                    tmp_path):
    """`--effort best` writes the same tensors and plan as the former defaults set by hand
    (beam 4, 1000 reconstruction steps, 4x streamed refit, no time limit)."""
    folder = trained_checkpoint("moe")
    common = ["prune", str(folder), *_data_args(sample_texts), "--ratio", "0.5",
              "--seq-len", "64", "--device", "cpu", "--dtype", "float32", "--max-tokens",
              "2560", "--reconstruct-steps", "1000"]  # 2048 fitted, 512 held out
    outs = []
    for name, extra in (("best", ["--effort", "best"]),
                        ("hand", ["--effort", "default", "--beam", "4", "--refit-tokens",
                                  "8192"])):
        out = tmp_path / name
        result = RUNNER.invoke(app, [*common, *extra, "--out", str(out),
                                     "--plan-out", str(tmp_path / f"{name}.json")])
        assert result.exit_code == 0, result.output
        outs.append(out)
    assert _tensors(outs[0]) == _tensors(outs[1])
    plans = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("best", "hand")]
    assert [p["layers"] for p in plans] == [plans[0]["layers"]] * 2


def _chooser(trained_checkpoint, sample_texts, **fields):
    """(layout, run(log) -> DataChoice) of `choose_with_data` at 50 % on the trained tiny MoE
    with these `DataOptions` fields (float32 on the CPU, 64-token windows)."""
    folder = trained_checkpoint("moe")
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    fingerprint = model_fingerprint(checkpoint, layout)
    sources = [DataSource(name, path) for name, path in sample_texts.items()]
    options = DataOptions(DataSpec(tuple(sources), seq_len=64),
                          run=RunOptions(device="cpu", dtype="float32"), **fields)

    def run(log=lambda _: None):
        return choose_with_data(folder, layout, fingerprint, criterion="measured", ratio=0.5,
                                protect={}, min_experts=None, options=options, log=log)
    return layout, fingerprint, run


def test_fast_refits_the_stats_plan_on_a_quarter_without_scoring_lanes(
        trained_checkpoint, sample_texts, monkeypatch):
    """`--effort fast`: the experts are those `ean` chooses on the run's own statistics (super
    experts protected), the layered run has only the pruned lane over the first quarter of the
    positions (the reference residuals come from the statistics pass), and the kept experts'
    down projections are refitted: to the same weights as with an original lane captured in
    the layered run (the path before, an independent computation of the references)."""
    from moekit.layerfit import lanes
    from moekit.ops.prune import calibrated
    from moekit.ops.prune.select import build_plan, merge_protect
    from moekit.stats.criteria import super_experts

    seen = []
    original = lanes.LaneRun.__init__

    def spy(self, cal, run_lanes, search, *args, **kwargs):
        seen.append(([lane.name for lane in run_lanes], sum(int(w.numel()) for w in cal.fit),
                     len(cal.held), search.kept))
        original(self, cal, run_lanes, search, *args, **kwargs)

    monkeypatch.setattr(lanes.LaneRun, "__init__", spy)
    layout, fingerprint, run = _chooser(trained_checkpoint, sample_texts, max_tokens=4096,
                                        effort="fast", beam=None, reconstruct_steps=None)
    choice = run()
    assert choice.chosen.name == "ean+compensate" and len(choice.candidates) == 1
    names, positions, held, kept = seen[0]
    assert names == ["pruned"] and held == 0
    assert positions <= 4096 // 4 + 64 and choice.info["refit_positions"] == positions
    guard = merge_protect({}, super_experts(choice.stats))
    plan = build_plan(layout, fingerprint, criterion="ean", ratio=0.5, stats=choice.stats,
                      protect=guard)
    assert {p.layer: list(p.kept) for p in plan.layers} == kept
    assert [list(p.kept) for p in choice.chosen.plan.layers] == [list(p.kept)
                                                                for p in plan.layers]
    assert choice.chosen.weights and all(
        v > 0 for layer in choice.chosen.rel_change.values() for v in layer.values())

    # the same run with the references captured from an original lane (no recorder)
    monkeypatch.setattr(calibrated, "ReferenceResiduals", lambda *args, **kwargs: None)
    before = run()
    assert seen[1][0] == ["original", "pruned"]
    assert before.chosen.plan.to_dict()["layers"] == choice.chosen.plan.to_dict()["layers"]
    assert before.chosen.weights.keys() == choice.chosen.weights.keys()
    for layer, weights in choice.chosen.weights.items():
        assert set(weights) == set(before.chosen.weights[layer])
        for e in weights:
            torch.testing.assert_close(weights[e], before.chosen.weights[layer][e],
                                       rtol=1e-4, atol=1e-5)


def test_default_search_takes_its_references_from_the_statistics_pass(
        trained_checkpoint, sample_texts, monkeypatch):
    """The measured search with a refit (`default`, no streamed refit, no router refit) has no
    `original` lane: the statistics pass records the unmodified residuals. The plan, the
    refitted and reconstructed weights and the held-out scores equal those of the same run with
    an original lane captured in the layered run (the path before)."""
    from moekit.layerfit import lanes
    from moekit.ops.prune import calibrated

    seen = []
    original = lanes.LaneRun.__init__

    def spy(self, cal, run_lanes, *args, **kwargs):
        seen.append([lane.name for lane in run_lanes])
        original(self, cal, run_lanes, *args, **kwargs)

    monkeypatch.setattr(lanes.LaneRun, "__init__", spy)
    # 2600 read, 2080 fitted: the capture stops inside a window, the recorded windows do not
    _, _, run = _chooser(trained_checkpoint, sample_texts, max_tokens=2600, effort="default",
                         beam=None, reconstruct_steps=60)
    choices = []
    for records in (True, False):
        monkeypatch.setattr(calibrated, "_records_reference",
                            lambda *args, records=records: records)
        choices.append(run())
    assert "original" not in seen[0] and seen[1][0] == "original"
    new, before = choices
    assert [c.name for c in new.candidates] == [c.name for c in before.candidates]
    assert new.chosen.plan.to_dict()["layers"] == before.chosen.plan.to_dict()["layers"]
    assert new.chosen.gate_up.keys() == before.chosen.gate_up.keys() and new.chosen.gate_up
    for mine, theirs in zip(new.candidates, before.candidates, strict=True):
        assert mine.kl == pytest.approx(theirs.kl, rel=1e-4, abs=1e-7)
        assert mine.weights.keys() == theirs.weights.keys()
        for layer, weights in mine.weights.items():
            for e in weights:
                torch.testing.assert_close(weights[e], theirs.weights[layer][e],
                                           rtol=1e-4, atol=1e-5)


def test_default_output_does_not_depend_on_the_machine_speed(trained_checkpoint, sample_texts,
                                                           monkeypatch):
    """`default`'s reconstruction limit is a step count from multiply-adds (`layerfit.compute`),
    not a share of measured time: with a clock that runs 10^4 times faster (a machine that
    looks slow or loaded) the run takes the same steps and writes the same weights."""
    import itertools
    import re
    import time

    _, _, run = _chooser(trained_checkpoint, sample_texts, max_tokens=2560, effort="default",
                         beam=None, reconstruct_steps=None)
    lines: list[list[str]] = [[], []]
    choices = []
    ticks = itertools.count()
    for slow in (False, True):
        if slow:
            monkeypatch.setattr(time, "perf_counter", lambda: 1e4 * next(ticks))
        choices.append(run(lines[slow].append))
    steps = [re.findall(r"reconstructed -> \S+ \(\d+ steps\)", "\n".join(found))
             for found in lines]
    assert steps[0] and steps[0] == steps[1]
    assert any("reconstruction up to" in line for line in lines[0])
    new, before = choices
    assert new.chosen.plan.to_dict()["layers"] == before.chosen.plan.to_dict()["layers"]
    for layer, weights in new.chosen.weights.items():
        for e in weights:
            assert torch.equal(weights[e], before.chosen.weights[layer][e])


def _fast_calibration(trained_checkpoint, sample_texts, max_tokens=4096):
    from moekit.calib.spec import DataSpec
    from moekit.layerfit.measured import load_calibration
    from moekit.runtime.options import RunOptions

    folder = trained_checkpoint("moe")
    layout = describe(Checkpoint(folder))
    sources = [DataSource(name, path) for name, path in sample_texts.items()]
    return load_calibration(folder, layout, DataSpec(tuple(sources), seq_len=64),
                            max_tokens=max_tokens, held_out=0.0,
                            run=RunOptions(device="cpu", dtype="float32"))


def test_statistics_pass_records_the_unmodified_residuals(trained_checkpoint, sample_texts,
                                                          tmp_path):
    """`ReferenceResiduals` during the statistics pass: layer l's rows equal the decoder-layer
    outputs of the unmodified model on the first windows, captured independently by
    `calib.capture.capture_layers`, in window order; later windows are not recorded."""
    from moekit.calib.capture import capture_layers
    from moekit.layerfit.reference import ReferenceResiduals
    from moekit.ops.prune.quality import calibration_stats
    from moekit.runtime.spill import TensorSpill

    cal = _fast_calibration(trained_checkpoint, sample_texts)
    lead = 3
    residuals = ReferenceResiduals(cal.blocks, lead, TensorSpill(folder=str(tmp_path)))
    stats = calibration_stats(cal, "fp", residuals)
    plain = calibration_stats(cal, "fp")
    assert stats.sha256 == plain.sha256  # recording changes no statistic
    positions = sum(int(w.numel()) for w in cal.fit[:lead])
    captured = capture_layers(cal.model, cal.family, cal.fit[:lead], max_tokens=positions,
                              outputs=False, residual=True)
    assert len(residuals.spill.names) == lead * len(cal.blocks)
    for block in cal.blocks:
        got = residuals.get(block.layer)
        assert got.shape == (positions, cal.model.config.hidden_size)
        torch.testing.assert_close(got, captured[block.layer].residual, rtol=1e-5, atol=1e-5)
    residuals.close()


def test_fast_probe_runs_one_moe_layer_on_fewer_positions(trained_checkpoint, sample_texts):
    """`fast`'s probe (`fixed`): FAST_PROBE_POSITIONS (whole windows, at least two), the
    run stopped after the first MoE layer; the default probe runs every layer on
    PROBE_POSITIONS."""
    from moekit.layerfit import estimate

    cal = _fast_calibration(trained_checkpoint, sample_texts)
    calls: dict[int, int] = {}
    handles = [b.decoder_layer.register_forward_hook(
        lambda m, a, o, layer=b.layer: calls.__setitem__(layer, calls.get(layer, 0) + 1))
        for b in cal.blocks]
    try:
        fast = estimate.probe(cal, n_drop=2, beam=1, refit=True, reconstruct=False, fixed=True)
        ran_fast = dict(calls)
        calls.clear()
        slow = estimate.probe(cal, n_drop=2, beam=1, refit=True, reconstruct=False)
    finally:
        for handle in handles:
            handle.remove()
    windows = estimate._probe_windows(cal.fit, estimate.FAST_PROBE_POSITIONS)
    assert sum(int(w.numel()) for w in windows) < estimate.FAST_PROBE_POSITIONS + 64
    first = cal.blocks[0].layer
    # the first MoE layer: the lane run and the capture (twice), no later layer
    assert set(ran_fast) == {first} and ran_fast[first] == 2 * len(windows)
    assert set(calls) == {b.layer for b in cal.blocks}
    assert fast.forward > 0 and fast.select > 0 and slow.forward > 0
