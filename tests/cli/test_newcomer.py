"""What a new user meets in the first hour (issue 12): a reproducible demo, one-line errors,
readable help at 80 columns, the reference's own numbers in `eval --ref`, a plan that keeps its
cost, honest merges and fingerprint overrides, a quiet stderr and a self-contained report.html."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from prune_support import write_synthetic_stats
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import MoekitError

ROOT = Path(__file__).resolve().parents[2]
RUNNER = CliRunner()
FAST = ["--seq-len", "32", "--max-tokens", "256", "--batch-size", "4", "--device", "cpu"]


def run(*args: object, **kw):  # noqa: ANN201 - click Result
    return RUNNER.invoke(app, [str(a) for a in args], **kw)


def stats_for(tmp_path: Path, folder: Path, name: str = "stats") -> Path:
    """Synthetic statistics with an uneven, fixed ranking (t_j = (7 j + 3) mod 11 + 1)."""
    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint

    layout = describe(Checkpoint(folder))
    tokens = {layer.index: [float((7 * j + 3) % 11 + 1) for j in range(layer.num_experts)]
              for layer in layout.moe_layers}
    return write_synthetic_stats(tmp_path / name, folder, tokens)


# --- item 2: the demo trains a fixed, seeded number of steps ------------------------------------

def test_demo_training_is_a_fixed_seeded_step_count():
    import torch
    from tiny_models import _demo_module

    demo = _demo_module()
    assert "--steps" in (ROOT / "scripts" / "demo.sh").read_text()
    assert "--seconds" not in (ROOT / "scripts" / "demo.sh").read_text()
    streams = {d: torch.arange(500) % 97 + 3 * i for i, d in enumerate("abc")}
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(128, 8), torch.nn.Linear(8, 128))
        model.config = type("C", (), {})()  # a dense "model": no router_aux_loss_coef
        model.forward = _lm_forward(model)
        demo.train_lm(model, streams, steps=5, seed=3, seq=16, batch_per_domain=2)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def _lm_forward(model):  # noqa: ANN001, ANN202
    """A causal-LM-shaped forward for a plain nn.Sequential (loss = next-token CE)."""
    import torch

    layers = list(model)

    def forward(batch, labels=None, **_):  # noqa: ANN001, ANN202
        logits = layers[1](layers[0](batch))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                 labels[:, 1:].flatten())
        return type("Out", (), {"loss": loss, "aux_loss": None})()

    return forward


# --- item 3, 4, 5: one-line errors, --dry-run without --out, --debug anywhere -------------------

def test_prune_of_a_dense_model_says_so(tiny_checkpoint):
    result = run("prune", tiny_checkpoint("llama"), "--ratio", "0.25", "--dry-run")
    assert result.exit_code == 2, result.output
    assert "is a dense model (llama): nothing to prune" in result.output
    assert "AssertionError" not in result.output


def test_upcycle_dry_run_needs_no_out(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("upcycle", tiny_checkpoint("llama"), "-e", "8", "-k", "2", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["experts"] == 8 and not any(tmp_path.iterdir())
    missing = run("upcycle", tiny_checkpoint("llama"), "-e", "8", "-k", "2")
    assert missing.exit_code == 2 and "--out is required" in missing.output


def test_debug_is_accepted_after_the_command(tmp_path):
    quiet = run("inspect", tmp_path / "missing")
    assert quiet.exit_code == 2 and quiet.exception is not None and "Traceback" not in quiet.output
    loud = run("inspect", tmp_path / "missing", "--debug")
    assert isinstance(loud.exception, MoekitError), loud.output  # traceback, not "no such option"
    literal = run("inspect", tmp_path / "missing", "--", "--debug")  # after --: an argument
    assert not isinstance(literal.exception, MoekitError)


# --- item 6 and 12: eval --ref shows the reference's own numbers; KL never -0.0000 --------------

def test_eval_ref_reports_the_reference_loss(tiny_checkpoint, tmp_path):
    from moekit.calib.data import DataSource
    from moekit.calib.spec import DataSpec
    from moekit.ops.evaluate import evaluate
    from moekit.runtime.options import RunOptions

    model, ref = tiny_checkpoint("mixtral"), tiny_checkpoint("mixtral", seed=1)
    text = tmp_path / "t.txt"
    text.write_text((ROOT / "sample_data" / "en_docs.txt").read_text()[:4000])
    sources = [DataSource("t", text)]
    data = DataSpec(tuple(sources), seq_len=32, max_tokens=256)
    opts = dict(batch_size=4, run=RunOptions(device="cpu", dtype="float32"))
    both = evaluate(model, data, ref, keep_both=True, **opts).overall
    alone = evaluate(ref, data, **opts).overall  # independent: the reference on its own
    assert both.ref_loss == pytest.approx(alone.loss, rel=1e-6)
    assert both.ref_ppl == pytest.approx(alone.ppl, rel=1e-6)
    assert abs(both.loss - both.ref_loss) > 1e-3  # two different models: the test can fail
    result = run("eval", model, "--ref", ref, "--data", f"t={text}", *FAST,
                 env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "ref ppl" in result.stdout and "Δ ppl" in result.stdout
    change = f"{both.ppl / both.ref_ppl - 1:+.1%}"
    assert change in result.stdout


def test_kl_is_never_printed_as_minus_zero():
    from rich.console import Console

    from moekit.cli.render import eval_table

    row = dict(name="x", tokens=10, loss=1.0, ppl=2.718, kl=-3e-9, top1=1.0, ref_loss=1.0,
               ref_ppl=2.718)
    console = Console(width=100, record=True)
    console.print(eval_table({"model": "m", "ref": "r", "domains": [row], "overall": row}))
    text = console.export_text()
    assert "0.0000" in text and "-0.0000" not in text


# --- item 7 and 9: a saved plan keeps its cost; --ignore-fingerprint leaves a trace -------------

def test_plan_file_shows_its_cost_without_stats(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("mixtral")
    stats, plan = stats_for(tmp_path, model), tmp_path / "plan.json"
    first = run("prune", model, "--stats", stats, "--ratio", "0.25", "--dry-run", "--json",
                "--plan-out", plan)
    assert first.exit_code == 0, first.output
    replay = run("prune", model, "--plan", plan, "--dry-run", "--json")
    assert replay.exit_code == 0, replay.output
    before, after = (json.loads(r.stdout)["budget"] for r in (first, replay))
    for old, new in zip(before, after, strict=True):
        assert new["traffic_removed"] == pytest.approx(old["traffic_removed"])
        assert new["weight_removed"] == pytest.approx(old["weight_removed"])
        assert new["traffic_removed"] is not None and new["traffic_removed"] > 0
    out = tmp_path / "pruned"
    applied = run("prune", model, "--plan", plan, "--out", out)
    assert applied.exit_code == 0, applied.output
    card = (out / "README.md").read_text()
    assert " - | - |" not in card.split("## What was removed")[1]
    assert "base_model:" not in card and f"local checkpoint `{model}`" in card  # not a Hub id


def test_ignore_fingerprint_warns_and_is_recorded(tiny_checkpoint, tmp_path):
    model, other = tiny_checkpoint("mixtral"), tiny_checkpoint("mixtral", seed=1)
    plan = tmp_path / "plan.json"
    made = run("prune", other, "--stats", stats_for(tmp_path, other), "--ratio", "0.25",
               "--dry-run", "--plan-out", plan)
    assert made.exit_code == 0, made.output
    out = tmp_path / "out"
    result = run("prune", model, "--plan", plan, "--ignore-fingerprint", "--out", out)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "--ignore-fingerprint" in result.output
    provenance = json.loads((out / "moekit_provenance.json").read_text())
    assert any("--ignore-fingerprint" in w for w in provenance["warnings"]), provenance
    out2 = tmp_path / "out2"
    stats = run("prune", model, "--stats", stats_for(tmp_path, other, "s2"), "--ratio", "0.25",
                "--ignore-fingerprint", "--out", out2)
    assert stats.exit_code == 0, stats.output
    provenance = json.loads((out2 / "moekit_provenance.json").read_text())
    assert any("stats were taken on model" in w for w in provenance["warnings"]), provenance


# --- item 8: stats merge ---------------------------------------------------------------------

def test_stats_merge_refuses_the_same_data_twice(tiny_checkpoint, tmp_path, monkeypatch):
    from moekit.stats.profile_io import load_profile

    text = tmp_path / "a.txt"
    text.write_text((ROOT / "sample_data" / "code_py.txt").read_text()[:3000])
    prof = tmp_path / "p"
    made = run("profile", tiny_checkpoint("mixtral"), "--data", f"a={text}", "--out", prof,
               *FAST, "--no-plots")
    assert made.exit_code == 0, made.output
    refused = run("stats", "merge", prof, prof, "--out", tmp_path / "m", "--no-plots")
    assert refused.exit_code == 2 and "same data" in refused.output
    assert "--allow-duplicates" in refused.output and not (tmp_path / "m").exists()
    argv = ["stats", "merge", prof, prof, "--out", tmp_path / "m", "--no-plots",
            "--allow-duplicates"]
    monkeypatch.setattr(sys, "argv", ["moekit", *map(str, argv)])  # as the console script
    allowed = run(*argv)
    assert allowed.exit_code == 0 and "counted twice" in allowed.output
    single, merged = load_profile(prof), load_profile(tmp_path / "m")
    assert "stats merge" in merged.metadata["command"]
    assert "stats merge" not in single.metadata["command"]
    assert merged.metadata["domains"]["a"]["tokens"] == 2 * single.metadata["domains"]["a"][
        "tokens"]


# --- item 10: nothing but moekit's own lines on stderr ------------------------------------------

def test_no_library_noise_on_stderr(tiny_checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env["PYTHONPATH"] = str(ROOT)
    code = "from moekit.cli.app import main; main()"
    text = ROOT / "sample_data" / "en_docs.txt"  # one 70 kB document: longer than 256 tokens
    result = subprocess.run(
        [sys.executable, "-c", code, "upcycle", str(tiny_checkpoint("llama")), "-e", "4", "-k",
         "2", "--router", "data", "--data", str(text), "--max-tokens", "256", "-o",
         str(tmp_path / "moe")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    for noise in ("Token indices sequence length", "Loading weights", "UserWarning", "it/s"):
        assert noise not in result.stderr, result.stderr


# --- item 11: help at 80 columns ---------------------------------------------------------------

def _commands() -> list[list[str]]:
    import typer

    group = typer.main.get_command(app)
    names = [[name] for name, cmd in group.commands.items() if not hasattr(cmd, "commands")]
    names += [[name, sub] for name, cmd in group.commands.items() if hasattr(cmd, "commands")
              for sub in cmd.commands]
    return [[], *names]


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "moekit")
def test_help_reads_well_at_80_columns(command):
    result = run(*command, "--help", env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "<bool>" not in text and "<str>" not in text and "{" not in text.split("\n")[0]
    usage = text.splitlines()[0]
    assert usage.startswith("Usage: moekit"), usage
    if command and command[0] in ("inspect", "profile", "prune", "eval", "upcycle"):
        assert usage.endswith("[OPTIONS] MODEL"), usage
    lines = text.splitlines()
    for i, line in enumerate(lines):  # options: every one has a description
        if not line.startswith("  -"):
            continue
        names, _, description = line.strip().partition("  ")
        if not description.strip():  # a long name: the description starts on the next line
            description = lines[i + 1] if i + 1 < len(lines) else ""
        assert description.strip() and not description.strip().startswith("["), (line, text)


def test_pre_wrapped_docstrings_are_reflowed():
    result = run("upcycle", "--help", env={"COLUMNS": "80"}, terminal_width=80)
    prose = " ".join(result.stdout.split())
    assert "split keeps it with --router zero --top-k E; drop" in prose
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "copy keeps" in line)
    paragraph = lines[start:lines.index("", start)]
    assert all(len(line.rstrip()) > 60 for line in paragraph[:-1]), paragraph  # not ragged


# --- item 12: docs a user can follow; co-activation over a handful of tokens is masked ----------

def test_docs_name_no_files_a_user_does_not_have():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if path.name == "benchmarks.md":  # measurements: says where they were taken
            continue
        assert "shared/fixtures" not in path.read_text(), path
    readme = (ROOT / "README.md").read_text()
    assert "removes the coldest" not in readme
    assert "build_demo_model.py" in (ROOT / "docs" / "upcycle.md").read_text()


def test_coactivation_plot_masks_rarely_used_experts(tmp_path):
    from moekit.stats.plots import MIN_COACT_TOKENS, coactivation_values

    counts = np.array([[100, 40, 60], [40, 50, 10], [60, 10, 1]])
    values = coactivation_values(counts)
    assert values[0, 1] == pytest.approx(0.4) and np.isnan(values[0, 0])
    assert np.isnan(values[2]).all() and counts[2, 2] < MIN_COACT_TOKENS


# --- item 13: report.html ---------------------------------------------------------------------

class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def test_report_html_is_self_contained(tiny_checkpoint, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text((ROOT / "sample_data" / "en_bible.txt").read_text()[:3000])
    out = tmp_path / "p"
    result = run("profile", tiny_checkpoint("olmoe"), "--data", f"a={text}", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    pngs = sorted(out.glob("*.png"))
    assert len(parser.sources) == len(pngs) >= 4
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,"), source[:80]
        raw = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert raw in {p.read_bytes() for p in pngs}
    assert {"table", "h1", "h2", "li"} <= set(parser.tags)
    assert "report.html" in result.output
