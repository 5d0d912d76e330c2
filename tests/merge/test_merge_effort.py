"""`merge --effort fast|default|best` (`ops/merge/effort.py`):
- the levels resolve to their documented positions, explicit `--max-tokens`/`--refit-tokens`
  override their part, and the names are `prune --data --effort`'s;
- `default` writes what the library wrote before the levels (no effort record either);
- `fast` is, bit for bit, an independent recipe: `moekit profile` on the N positions, then the
  default merge with that `--stats` folder on N/4 positions;
- `best` streams the down refit over 4 x the positions (as given to the refit's tokeniser), and
  `--refit-tokens` sets that count at any level.
"""

from __future__ import annotations

import json

import pytest
from merge_support import assert_same_folders, corpus, merge_with
from support import merge, stats_for
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import InvalidArgumentError
from moekit.ops.merge import effort as effort_mod
from moekit.ops.merge.effort import EFFORTS, MergeTokens, resolve_tokens
from moekit.ops.prune.effort import EFFORTS as PRUNE_EFFORTS


def test_levels_resolve_to_their_documented_positions():
    assert EFFORTS == PRUNE_EFFORTS  # one option name, one meaning across commands
    assert resolve_tokens("default", 16384) == MergeTokens(16384, 16384, None)
    assert resolve_tokens("fast", 16384) == MergeTokens(16384, 4096, None)
    assert resolve_tokens("fast", 1001) == MergeTokens(1001, 251, None)  # rounded up
    assert resolve_tokens("best", 16384) == MergeTokens(16384, 16384, 4 * 16384)
    assert resolve_tokens("best", 16384, refit_fits=False) == MergeTokens(16384, 16384, None)


def test_explicit_refit_tokens_override_every_level():
    for level in EFFORTS:
        found = resolve_tokens(level, 8192, refit_tokens=30000, refit_fits=False)
        assert found.refit == 30000 and found.statistics == 8192
    # no more than the measured run's own positions: nothing to stream
    assert resolve_tokens("best", 8192, refit_tokens=8192).refit is None
    assert resolve_tokens("fast", 8192, refit_tokens=4000).refit == 4000  # > 2048 measured
    with pytest.raises(InvalidArgumentError, match="unknown --effort 'bogus'"):
        effort_mod.effort_settings("bogus")


def _data_args(sources) -> list[str]:  # noqa: ANN001
    return [a for s in sources for a in ("--data", f"{s.name}={s.path}")]


def _common(sources) -> list[object]:  # noqa: ANN001
    return [*_data_args(sources), "--data-range", "0:0.5", "--seq-len", "64", "--ratio", "0.5",
            "--device", "cpu"]


def test_default_level_writes_what_the_library_wrote_before_levels(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral")
    sources, stats = corpus(tmp_path), stats_for(tmp_path, source)
    options = dict(max_tokens=1000, seq_len=64, batch_size=4, device="cpu", tokenizer=None,
                   dtype="auto", max_memory="auto", text_field="text", fraction=(0.0, 0.5))
    before = merge_with(source, sources, stats, tmp_path / "lib", "m-smoe", "fit-layer",
                        one_pass=True, options=options)
    result = merge(source, "--stats", stats, *_common(sources), "--max-tokens", "1000",
                   "--effort", "default", "--out", tmp_path / "cli")
    assert result.exit_code == 0, result.output
    assert "effort default: statistics on 1000 positions, grouping and refit on 1000" in \
        result.stderr
    assert_same_folders(tmp_path / "cli", tmp_path / "lib")
    record = json.loads((tmp_path / "cli" / "moekit_provenance.json").read_text())
    assert "effort" not in record["calibration"] and before["calibration"]["tokens"] == 1000


def test_fast_is_profile_on_n_then_the_default_merge_on_a_quarter(tiny_checkpoint, tmp_path):
    """Independent recipe: `moekit profile --max-tokens N` (float32, as the merge's statistics
    pass runs), then `merge --stats` it `--max-tokens N/4`: same clusters, same bytes."""
    source = tiny_checkpoint("mixtral")
    sources = corpus(tmp_path)
    fast_plan, default_plan = tmp_path / "fast.json", tmp_path / "default.json"
    result = merge(source, *_common(sources), "--max-tokens", "2000", "--effort", "fast",
                   "--plan-out", fast_plan, "--out", tmp_path / "fast")
    assert result.exit_code == 0, result.output
    assert "effort fast: statistics on 2000 positions, grouping and refit on 500" in \
        result.stderr
    profile = CliRunner().invoke(app, [str(a) for a in (
        "profile", source, *_data_args(sources), "--data-range", "0:0.5", "--seq-len", "64",
        "--max-tokens", "2000", "--dtype", "float32", "--device", "cpu", "--batch-size", "4",
        "--no-plots", "--out", tmp_path / "prof")])
    assert profile.exit_code == 0, profile.output
    result = merge(source, "--stats", tmp_path / "prof", *_common(sources), "--max-tokens",
                   "500", "--plan-out", default_plan, "--out", tmp_path / "default")
    assert result.exit_code == 0, result.output
    plans = [json.loads(p.read_text()) for p in (fast_plan, default_plan)]
    assert plans[0]["layers"] == plans[1]["layers"]
    assert any(len(c) > 1 for c in plans[0]["layers"][0]["clusters"])
    calibration = plans[0]["calibration"]
    assert (calibration["effort"], calibration["stats_tokens"], calibration["max_tokens"],
            calibration["tokens"]) == ("fast", 2000, 500, 500)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "fast" / name).read_bytes() == \
            (tmp_path / "default" / name).read_bytes(), name


@pytest.mark.parametrize(("extra", "streamed"), [
    (("--effort", "best"), 4000), (("--effort", "best", "--refit-tokens", "1500"), 1500),
    (("--refit-tokens", "2500"), 2500), (("--effort", "best", "--refit-tokens", "900"), None)])
def test_best_and_refit_tokens_stream_the_refit(extra, streamed, tiny_checkpoint, tmp_path,
                                                monkeypatch):
    import moekit.ops.merge.refit

    seen: list[dict] = []
    original = moekit.ops.merge.refit.load_calibration

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(moekit.ops.merge.refit, "load_calibration", recorded)
    source = tiny_checkpoint("mixtral")
    sources = corpus(tmp_path)
    result = merge(source, "--stats", stats_for(tmp_path, source), *_common(sources),
                   "--max-tokens", "1000", *extra, "--plan-out", tmp_path / "plan.json",
                   "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(seen) == 1 and seen[0].get("refit_tokens") == streamed
    assert seen[0]["max_tokens"] == 1000
    record = json.loads((tmp_path / "out" / "moekit_provenance.json").read_text())
    assert record["calibration"]["refit"]["layers"]
    if "--effort" in extra:
        assert record["calibration"]["refit_tokens"] == streamed


def test_bad_refit_tokens_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral")
    result = merge(source, *_common(corpus(tmp_path)), "--refit-tokens", "0", "--out",
                   tmp_path / "o")
    assert result.exit_code == 2 and "--refit-tokens must be at least 1" in result.stderr
    assert not (tmp_path / "o").exists()


def test_effort_help_names_the_levels():
    result = CliRunner().invoke(app, ["merge", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--effort" in text and "--refit-tokens" in text
    assert all(level in text for level in EFFORTS)


def test_estimate_counts_the_merge_lanes_by_hand():
    """`layerfit.estimate.predict` with the merge's grouping sample, against the sum by hand."""
    from moekit.layerfit.estimate import WRITE_RATE, Probe, RunShape, predict

    found = Probe(forward=2e-4, capture=3e-5, select=5e-5, step=0.0, seconds=1.0)
    n, extra, held, sample, layers = 4000, 12000, 1000, 4000, 4
    shape = RunShape(n, extra, held, 2, 3, 2, 0, layers, 10**8, sample=sample)
    stages = predict(found, shape)
    assert stages["lanes"] == pytest.approx(2e-4 * (2 * (n + extra) + 3 * held + sample))
    assert stages["capture"] == pytest.approx(layers * 3e-5 * (2 * n + 2 * extra + sample))
    assert stages["search+refit"] == pytest.approx(layers * 5e-5 * (n + extra))
    assert stages["reconstruction"] == 0 and stages["write"] == pytest.approx(1e8 / WRITE_RATE)
    without = predict(found, RunShape(n, extra, held, 2, 3, 2, 0, layers, 10**8))
    assert stages["lanes"] - without["lanes"] == pytest.approx(2e-4 * sample)


def test_merge_prints_its_estimate_first(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral")
    result = merge(source, "--stats", stats_for(tmp_path, source), *_common(corpus(tmp_path)),
                   "--max-tokens", "1000", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("estimate: about "))
    assert not any(line.startswith("  layer ") for line in lines[:first])  # before the run
    assert "peak memory" in lines[first] and "probe" in " ".join(lines[first:first + 2])
