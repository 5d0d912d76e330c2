"""Issue 24 items 8 and 9, what was still wrong: command summaries cut mid-sentence in a group's
help, the merged model card's empty output-error column under the default method, two meanings
of "share", and an eval title broken inside a path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from support import stats_for
from typer.testing import CliRunner

from moekit.cli.app import app

RUNNER = CliRunner()
SAMPLE = Path(__file__).parents[2] / "sample_data" / "en_docs.txt"


def run(*args: object, **kw):  # noqa: ANN201 - click Result
    return RUNNER.invoke(app, [str(a) for a in args], **kw)


# ---- item 9: `moekit --help` and `moekit stats --help` give each command's whole summary ------

def _groups() -> list[tuple[list[str], object]]:
    import typer

    top = typer.main.get_command(app)
    return [([], top), *[([name], group) for name, group in top.commands.items()
                         if hasattr(group, "commands")]]


@pytest.mark.parametrize("words, group", _groups(), ids=lambda x: " ".join(x) if
                         isinstance(x, list) else "")
def test_group_help_gives_every_summary_whole(words, group):
    from moekit.cli.help import summary

    result = run(*words, "--help", env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    listing = result.stdout.split("Commands:\n", 1)[1]
    prose = " ".join(listing.split())
    assert "..." not in listing, listing
    for name, command in group.commands.items():
        first = summary(command.help)
        assert first.endswith(".") and len(first) > 20, (name, first)
        assert f"{name} {first}" in prose, (name, first, listing)
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_summary_is_the_first_sentence_not_an_abbreviation():
    from moekit.cli.help import summary

    assert summary("Add A (e.g. x. y) and B. More.") == "Add A (e.g. x. y) and B."
    assert summary("Use it e.g. here, i.e. now.\n\nSecond paragraph.") == \
        "Use it e.g. here, i.e. now."
    assert summary("No full stop") == "No full stop"


# ---- item 8: the merged card's output error is what merge measured ----------------------------

@pytest.fixture
def model(tiny_checkpoint, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "model"))


@pytest.fixture
def stats(model: Path, tmp_path: Path) -> Path:
    return stats_for(tmp_path, model)


def _card_rows(card: str) -> list[list[str]]:
    section = card.split("## What was merged", 1)[1].split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()]


def test_merged_card_shows_the_default_methods_measured_error(model, stats, tmp_path):
    """Default method (fit-layer): every layer's held-out error, centres -> refitted, as the
    provenance's refit record has it; never '-' on every row."""
    out = tmp_path / "out"
    result = run("merge", model, "--stats", stats, "--ratio", "0.5", "--data", f"d={SAMPLE}",
                 "--max-tokens", "256", "--seq-len", "32", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "moekit_provenance.json").read_text())
    assert record["method"] == "fit-layer"
    layers = record["calibration"]["refit"]["layers"]
    header, _, *rows = _card_rows((out / "README.md").read_text())
    assert header[-1] == "held-out output error: centres -> refitted", header
    assert len(rows) == len(record["layers"]) == len(layers)
    for row in rows:
        info = layers[row[0]]
        numbers = [float(x) for x in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", row[-1])]
        assert numbers[:2] == pytest.approx([info["held_out_before"], info["held_out_after"]],
                                            rel=1e-3), row
    assert "held-out quarter" in (out / "README.md").read_text()


def test_merged_card_without_a_measured_error_has_no_error_column(model, stats, tmp_path):
    out = tmp_path / "out"
    result = run("merge", model, "--stats", stats, "--ratio", "0.5", "--group", "weight",
                 "--method", "average", "--out", out)
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    header, _, *rows = _card_rows(card)
    assert len(header) == 3 and all(len(row) == 3 for row in rows), (header, rows)
    assert "No output error was measured: `--method average`" in card


# ---- item 9: one meaning of "share", named in every header -----------------------------------

def test_share_is_the_share_of_routed_slots_in_every_table(tmp_path):
    """The coldest-experts table, the domain specialisation and the uncertainty table give one
    number for one expert: its routed slots / all the layer's routed slots (counted here from
    the routing ids), and every printed header calls it "slot share"."""
    import numpy as np
    from synthetic_profile import synthetic_profile

    from moekit.stats.metrics import coldest, specialisation
    from moekit.stats.report import coldest_rich_table, write_report
    from moekit.stats.uncertainty import profile_uncertainty

    profile, ids = synthetic_profile([np.linspace(1, 3, 8)] * 2, k=2, tokens=2560, window=32)
    counts = {layer: np.bincount(ids[i][0].ravel(), minlength=8)
              for i, layer in enumerate(profile.moe_layers)}
    expected = {(layer, e): c[e] / c.sum() for layer, c in counts.items() for e in range(8)}
    cold = coldest(profile, 16)
    spec = specialisation(profile)
    experts, _ = profile_uncertainty(profile, ratio=0.25, seed=1)
    for frame in (cold, spec, experts):
        for row in frame.to_dict("records"):
            assert row["share"] == pytest.approx(expected[(row["layer"], row["expert"])]), row
    headers = coldest_rich_table(profile).headers
    assert "slot\nshare" in headers and "share" not in headers
    write_report(profile, tmp_path, {})
    report = (tmp_path / "report.md").read_text()
    for line in report.splitlines():
        if line.startswith("| layer"):
            assert "| share" not in line, line
    assert "| slot_share |" in report


# ---- item 9: a path in a table title is broken only at a separator ---------------------------

def test_eval_title_breaks_paths_only_at_separators():
    """rich folds a long title inside a word (`.../prun` + `ed`); the heading breaks after
    `/` or a space, and every path component stays whole on one line."""
    import io

    from rich.console import Console

    from moekit.cli.render import eval_table

    model = "/tmp/pytest-of-someone/pytest-1234/test_a_long_test_name0/pruned_checkpoint"
    ref = "/tmp/pytest-of-someone/pytest-1234/test_a_long_test_name0/original_checkpoint"
    row = dict(name="d", tokens=10, loss=1.0, ppl=2.7, kl=0.01, top1=0.9, ref_loss=1.0,
               ref_ppl=2.7)
    for width in (40, 80):
        console = Console(width=width, file=io.StringIO(), record=True)
        console.print(eval_table({"model": model, "ref": ref, "domains": [row],
                                  "overall": row}))
        lines = console.export_text().splitlines()
        assert all(len(line) <= width for line in lines)
        words = {w for line in lines for w in line.replace("/", " ").split()}
        for part in (*model.split("/"), *ref.split("/")):
            assert not part or part in words, (part, lines)


def test_wrap_at_separators():
    from moekit.cli.heading import wrap_at_separators

    assert wrap_at_separators("/a/bb/ccc vs /dd", 6) == ["/a/bb/", "ccc vs", "/dd"]
    assert wrap_at_separators("/a/" + "x" * 10 + "/b", 5) == ["/a/", "x" * 10 + "/", "b"]
