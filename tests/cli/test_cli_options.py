"""The shared run/data options (docs/options.md): every command that runs a model takes them
with the same names, help text and defaults as the docs table says, and `--max-tokens N` reads
at most N tokens in total over the --data sources, an equal share from each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from support import stats_for
from typer.testing import CliRunner

import moekit.calib.data
from moekit.cli.app import app
from moekit.layerfit.measured import default_read
from moekit.layerfit.tokens import DEFAULT_TOKENS, PRUNE_TOKENS
from moekit.ops.evaluate import EVAL_TOKENS
from moekit.ops.profile import PROFILE_TOKENS
from moekit.ops.prune.calibrated import DataOptions
from moekit.ops.upcycle.plan import UPCYCLE_TOKENS

DOC = Path(__file__).resolve().parents[2] / "docs" / "options.md"
COMMANDS = ("profile", "eval", "prune", "merge", "upcycle")
RUNNER = CliRunner()


def _tables() -> list[list[list[str]]]:
    """Every markdown table of docs/options.md as rows of cells (header and rule dropped)."""
    tables, rows = [], []
    for line in [*DOC.read_text().splitlines(), ""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            tables.append(rows[2:])
            rows = []
    return tables


def _value(text: str) -> object:
    """A table default as the CLI holds it: `512` -> 512, none/off -> None/False."""
    text = text.strip().strip("`")
    if text.startswith("none"):
        return None
    if text == "off":
        return False
    return int(text) if text.isdigit() else text


def documented() -> dict[str, tuple[dict[str, object], tuple[str, ...]]]:
    """{option: ({command: default}, commands)} from the options table: `default` is
    `VALUE` or `VALUE (cmd: VALUE, ...)` for commands that differ on purpose."""
    found = {}
    for name, _, default, commands in _tables()[0]:
        option = re.findall(r"`(--[a-z-]+)`", name)[0]
        listed = tuple(c.strip() for c in commands.split(","))
        base, _, rest = default.partition(" (")
        values = {c: _value(base) for c in listed}
        for part in re.findall(r"(\w+): (`[^`]*`)", rest):
            values[part[0]] = _value(part[1])
        found[option] = (values, listed)
    return found


def _option(command: str, name: str):  # noqa: ANN202 - click.Option
    click_command = typer.main.get_command(app).commands[command]
    return next(p for p in click_command.params if name in p.opts)


def test_the_table_lists_every_command_that_runs_a_model():
    table = documented()
    assert set(table) == {"--data", "--data-range", "--text-field", "--tokenizer", "--seq-len",
                          "--max-tokens", "--device", "--dtype", "--max-memory",
                          "--trust-remote-code"}
    assert all(listed == COMMANDS for _, listed in table.values())


@pytest.mark.parametrize("option", sorted(documented()))
def test_every_command_takes_the_option_as_documented(option):
    defaults, listed = documented()[option]
    params = {command: _option(command, option) for command in listed}
    helps = {p.help for p in params.values()}
    assert len(helps) == 1, f"{option}: help differs between commands: {helps}"
    assert len({tuple(p.opts) for p in params.values()}) == 1, option
    for command, param in params.items():
        assert param.default == defaults[command], (option, command)
    assert len({repr(v) for v in defaults.values()}) == 1, f"{option}: defaults differ {defaults}"


def test_the_budget_table_matches_the_code():
    budgets = {row[0]: _value(row[1].split()[0]) for row in _tables()[1]}
    assert budgets == {"profile": PROFILE_TOKENS, "eval": EVAL_TOKENS, "prune": PRUNE_TOKENS,
                       "merge": DEFAULT_TOKENS, "upcycle": UPCYCLE_TOKENS}
    read = default_read(PRUNE_TOKENS, DataOptions.held_out, DataOptions.data.seq_len, 1)
    assert f"{read} tokens read from one source at `--seq-len {DataOptions.data.seq_len}`" in \
        DOC.read_text()


# ---- --max-tokens N reads at most N tokens, in equal shares --------------------------------

@pytest.fixture
def loaded(monkeypatch) -> list[dict[str, int]]:
    """Each call of `calib.data.load_domains`: {domain: tokens read}."""
    calls: list[dict[str, int]] = []
    real = moekit.calib.data.load_domains

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        domains = real(*args, **kwargs)
        calls.append({d.name: d.num_tokens for d in domains})
        return domains

    monkeypatch.setattr(moekit.calib.data, "load_domains", counting)
    return calls


def _data(texts: dict[str, Path]) -> list[str]:
    return [x for name, path in texts.items() for x in ("--data", f"{name}={path}")]


def _check(calls: list[dict[str, int]], total: int, sources: int) -> None:
    assert calls, "no data was read"
    for call in calls:
        assert len(call) == sources
        assert sum(call.values()) <= total, call
        assert all(n <= total // sources for n in call.values()), call
    assert sum(calls[0].values()) > total // 2, calls  # the budget was used, not ignored


N = 960


def test_profile_reads_max_tokens_in_total(tiny_checkpoint, sample_texts, loaded, tmp_path):
    result = RUNNER.invoke(app, ["profile", str(tiny_checkpoint("mixtral")), *_data(sample_texts),
                                 "--max-tokens", str(N), "--seq-len", "64", "--device", "cpu",
                                 "--no-plots", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    _check(loaded, N, len(sample_texts))
    assert result.output.rstrip().splitlines()[-1].startswith(
        "note: --max-tokens 960 counted the tokens read in total")  # after the work


def test_eval_reads_max_tokens_in_total(tiny_checkpoint, sample_texts, loaded):
    result = RUNNER.invoke(app, ["eval", str(tiny_checkpoint("mixtral")), *_data(sample_texts),
                                 "--max-tokens", str(N), "--seq-len", "64", "--device", "cpu",
                                 "--json"])
    assert result.exit_code == 0, result.output
    _check(loaded, N, len(sample_texts))


def test_prune_data_reads_max_tokens_in_total(tiny_checkpoint, sample_texts, loaded, tmp_path):
    result = RUNNER.invoke(app, ["prune", str(tiny_checkpoint("mixtral")), *_data(sample_texts),
                                 "--ratio", "0.25", "--effort", "fast", "--max-tokens", str(N),
                                 "--seq-len", "64", "--device", "cpu", "--dtype", "float32",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    _check(loaded, N, len(sample_texts))


def test_merge_data_reads_max_tokens_in_total(tiny_checkpoint, sample_texts, loaded, tmp_path):
    model = tiny_checkpoint("mixtral")
    result = RUNNER.invoke(app, ["merge", str(model), "--stats",
                                 str(stats_for(tmp_path, model)), "--ratio", "0.25",
                                 "--group", "m-smoe", "--method", "fit-centre",
                                 *_data(sample_texts), "--max-tokens", str(N), "--seq-len", "64",
                                 "--device", "cpu", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    _check(loaded, N, len(sample_texts))
    assert "note:" not in result.output  # merge's --max-tokens always counted in total


# ---- --export: one spelling; the old ones work for one release, with a note ----------------

@pytest.mark.parametrize(("old", "argv"), [
    ("--report", ["prune", "{m}", "--stats", "{s}", "--ratio", "0.5", "--dry-run"]),
    ("--export-table", ["profile", "{m}", "--data", "{d}", "--max-tokens", "256", "--seq-len",
                        "32", "--device", "cpu", "--no-plots", "--overwrite", "--out", "{o}"]),
])
def test_old_export_spellings_still_work_with_a_note(old, argv, tiny_checkpoint, sample_texts,
                                                     tmp_path):
    model = tiny_checkpoint("mixtral")
    stats = stats_for(tmp_path, model)
    args = [a.format(m=model, s=stats, d=sample_texts["en_docs"], o=tmp_path / "p")
            for a in argv]
    table = tmp_path / "table.csv"
    result = RUNNER.invoke(app, [*args, old, str(table)])
    assert result.exit_code == 0, result.output
    assert table.stat().st_size > 0
    assert f"note: {old} is now --export" in result.output
    both = RUNNER.invoke(app, [*args, old, str(table), "--export", str(tmp_path / "t2.csv")])
    assert both.exit_code == 2 and f"{old} and --export are both given" in both.output
    assert not (tmp_path / "t2.csv").exists()
