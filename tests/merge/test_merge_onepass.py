"""The one-pass merge (grouping inside the fit-layer refit's run, `ops/merge/onepass.py`) against
the two-pass path it replaces (`Calibration(one_pass=False)`: capture the sample, group, then
`refit_merged` with a tokenisation and engine of its own):
- every written file is byte for byte the same (tensors, config, model card), the provenance
  too apart from the time and the engine's own run record, for m-smoe and hc-smoe with
  fit-layer, and for methods and groupings that never shared a run;
- the shared path tokenises and opens the model once and never runs the separate capture;
- the CLI's default merge takes the shared path and writes what the two-pass library path does;
  `--dry-run` captures the sample alone and refits nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from merge_support import assert_same_folders, corpus, merge_with, without_run_records
from support import merge, stats_for

from moekit.families.layout import describe
from moekit.io.reader import Checkpoint


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):  # noqa: ANN001
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls += 1
        return self.fn(*args, **kwargs)


def record_grouping(monkeypatch) -> dict[int, list[tuple[torch.Tensor, ...]]]:  # noqa: ANN001
    """{layer: [(X, Z, distances) of each merge]} the grouping saw (wraps `run.distance_fn`)."""
    import moekit.ops.merge.run

    seen: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    original = moekit.ops.merge.run.distance_fn

    def wrapped(group, checkpoint, layout, calib):  # noqa: ANN001, ANN202
        inner = original(group, checkpoint, layout, calib)

        def distance(index: int) -> torch.Tensor:
            dist = inner(index)
            data = calib(index)
            seen.setdefault(index, []).append((data.inputs.clone(), data.logits.clone(), dist))
            return dist

        return distance

    monkeypatch.setattr(moekit.ops.merge.run, "distance_fn", wrapped)
    return seen


def count_passes(monkeypatch) -> dict[str, Counter]:  # noqa: ANN001
    import moekit.calib.data
    import moekit.ops.merge.run
    import moekit.runtime.engine

    counters = {"tokenise": Counter(moekit.calib.data.load_domains),
                "open": Counter(moekit.runtime.engine.open_model),
                "capture": Counter(moekit.ops.merge.run.capture_calibration)}
    monkeypatch.setattr(moekit.calib.data, "load_domains", counters["tokenise"])
    monkeypatch.setattr(moekit.runtime.engine, "open_model", counters["open"])
    monkeypatch.setattr(moekit.ops.merge.run, "capture_calibration", counters["capture"])
    return counters


@pytest.mark.parametrize(("model_type", "group", "method"), [
    ("mixtral", "m-smoe", "fit-layer"), ("mixtral", "hc-smoe", "fit-layer"),
    ("deepseek_v3", "m-smoe", "fit-layer"), ("qwen3_moe", "m-smoe", "fit-layer")])
def test_shared_run_writes_what_two_passes_write(model_type, group, method, tiny_checkpoint,
                                                 tmp_path, monkeypatch):
    source = tiny_checkpoint(model_type)
    sources, stats = corpus(tmp_path), stats_for(tmp_path, source)
    seen = record_grouping(monkeypatch)
    two = merge_with(source, sources, stats, tmp_path / "two", group, method, one_pass=False)
    counters = count_passes(monkeypatch)
    one = merge_with(source, sources, stats, tmp_path / "one", group, method, one_pass=True)
    assert {k: c.calls for k, c in counters.items()} == {"tokenise": 1, "open": 1,
                                                         "capture": 0}
    assert sorted(seen) == [m.index for m in describe(Checkpoint(source)).moe_layers]
    for layer, (a, b) in seen.items():  # the activations themselves, bit for bit
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), layer
    assert one["layers"] == two["layers"] and any(len(c) > 1 for c in two["layers"][0]["clusters"])
    assert without_run_records(one) == without_run_records(two)
    assert_same_folders(tmp_path / "one", tmp_path / "two")
    record = json.loads((tmp_path / "one" / "moekit_provenance.json").read_text())
    assert record["calibration"]["tokens"] == 1000
    assert record["calibration"]["refit"]["layers"]


@pytest.mark.parametrize(("group", "method"), [("m-smoe", "fit-centre"), ("weight", "fit-layer"),
                                               ("hc-smoe", "average")])
def test_unshared_methods_are_unchanged(group, method, tiny_checkpoint, tmp_path, monkeypatch):
    """Nothing to share (one pass already): the same result whichever `one_pass` says."""
    source = tiny_checkpoint("mixtral")
    sources, stats = corpus(tmp_path), stats_for(tmp_path, source)
    two = merge_with(source, sources, stats, tmp_path / "two", group, method, one_pass=False)
    counters = count_passes(monkeypatch)
    one = merge_with(source, sources, stats, tmp_path / "one", group, method, one_pass=True)
    assert counters["open"].calls == 1
    assert without_run_records(one) == without_run_records(two)
    assert_same_folders(tmp_path / "one", tmp_path / "two")


def test_cli_default_merge_shares_the_run_and_dry_run_refits_nothing(tiny_checkpoint, tmp_path,
                                                                      monkeypatch):

    import moekit.ops.merge.refit

    source = tiny_checkpoint("mixtral")
    sources, stats = corpus(tmp_path), stats_for(tmp_path, source)
    cli_options = dict(max_tokens=1000, seq_len=64, batch_size=4, device="cpu", tokenizer=None,
                       dtype="auto", max_memory="auto", text_field="text",
                       fraction=(0.0, 0.5))
    two = merge_with(source, sources, stats, tmp_path / "two", "m-smoe", "fit-layer",
                     one_pass=False, options=cli_options)
    args = [source, "--stats", stats, "--ratio", "0.5", "--criterion", "ean",
            *[a for s in sources for a in ("--data", f"{s.name}={s.path}")],
            "--data-range", "0:0.5", "--max-tokens", "1000", "--seq-len", "64"]
    counters = count_passes(monkeypatch)
    result = merge(*args, "--out", tmp_path / "one")
    assert result.exit_code == 0, result.output
    assert (counters["open"].calls, counters["capture"].calls) == (1, 0)
    assert_same_folders(tmp_path / "one", tmp_path / "two")

    def no_refit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("--dry-run ran the refit")

    monkeypatch.setattr(moekit.ops.merge.refit, "sequential_refit", no_refit)
    result = merge(*args, "--dry-run", "--plan-out", tmp_path / "plan.json")
    assert result.exit_code == 0, result.output
    assert (counters["open"].calls, counters["capture"].calls) == (2, 1)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["layers"] == two["layers"]
