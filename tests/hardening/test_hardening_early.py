"""Issue 24 item 7, the class: an invalid value of any option that names a choice (criterion,
grouping, method, router, dtype, effort, ablation method, data range, device ...) is refused in
one line, exit 2, before any model is loaded or any statistic recorded, in every command.
(`merge --criterion bogus --data ...` recorded statistics for 40 s before refusing it.)"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from prune_support import write_synthetic_stats
from typer.testing import CliRunner

from moekit.cli.app import app

SAMPLE = Path(__file__).parents[2] / "sample_data" / "en_docs.txt"
DATA = ("--data", f"d={SAMPLE}")
OPTIONS = {
    "merge": ("--criterion", "--group", "--method", "--router", "--dtype", "--domain", "--effort",
              "--data-range", "--device", "--max-memory"),
    "prune-stats": ("--criterion", "--dtype", "--effort", "--device"),
    "prune-data": ("--criterion", "--dtype", "--effort", "--data-range", "--device"),
    "profile": ("--dtype", "--ablation-method", "--data-range", "--device", "--max-memory"),
    "eval": ("--dtype", "--data-range", "--device", "--max-memory"),
    "upcycle": ("--arch", "--method", "--router", "--data-range"),
    "convert": ("--dtype", "--quantize", "--experts", "--quantize-layers", "--max-shard-size"),
}


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint

    root = tmp_path_factory.mktemp("early")
    model = Path(shutil.copytree(tiny_checkpoint("mixtral"), root / "model"))
    layout = describe(Checkpoint(model))
    tokens = {layer.index: [float(j + 1) for j in range(layer.num_experts)]
              for layer in layout.moe_layers}
    return {"model": model, "dense": tiny_checkpoint("llama"),
            "stats": write_synthetic_stats(root / "stats", model, tokens)}


def command(case: str, inputs: dict[str, Path], out: Path) -> list[object]:
    model = inputs["model"]
    return {"merge": ["merge", model, *DATA, "--ratio", "0.5", "--out", out],
            "prune-stats": ["prune", model, "--stats", inputs["stats"], "--ratio", "0.5",
                            "--out", out],
            "prune-data": ["prune", model, *DATA, "--ratio", "0.5", "--out", out],
            "profile": ["profile", model, *DATA, "--out", out],
            "eval": ["eval", model, *DATA],
            "upcycle": ["upcycle", inputs["dense"], "-e", "4", "-k", "2", "--router", "data",
                        *DATA, "--out", out],
            "convert": ["convert", model, "--dtype", "bf16", "--out", out]}[case]


@pytest.mark.parametrize("case, option", [(c, o) for c, opts in OPTIONS.items() for o in opts])
def test_a_bad_choice_is_refused_before_any_work(case, option, inputs, monkeypatch, tmp_path):
    import moekit.runtime.engine as engine

    def loaded(*args: object, **kwargs: object) -> None:
        raise RuntimeError("model loaded")  # not pytest.fail: the CLI's handling stays normal

    monkeypatch.setattr(engine, "open_model", loaded)
    started = time.monotonic()
    args = [*command(case, inputs, tmp_path / "o"), option, "bogus"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "model loaded" not in result.output and result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "bogus" in lines[0], \
        result.stderr
    assert time.monotonic() - started < 10
    assert not (tmp_path / "o").exists()


# ---- item 24: random binary data is not profiled as if it were text ---------------------------

def test_binary_data_is_refused_and_latin1_text_is_not(tmp_path):
    import random

    from tiny_models import tokenizer

    from moekit.calib.data import DataSource, load_domains
    from moekit.errors import DataError

    rng = random.Random(0)
    (tmp_path / "rand.txt").write_bytes(bytes(rng.randrange(256) for _ in range(100_000)))
    french = "Les élèves étaient à l'école; où était-il? " * 500
    (tmp_path / "latin1.txt").write_bytes(french.encode("latin-1"))  # invalid UTF-8 here and there
    options = dict(seq_len=32, max_tokens=512)
    with pytest.raises(DataError, match=r"rand.txt does not look like text: \d+% of its first"):
        load_domains([DataSource("r", tmp_path / "rand.txt")], tokenizer(), **options)
    assert load_domains([DataSource("f", tmp_path / "latin1.txt")], tokenizer(), **options)
    assert load_domains([DataSource("d", SAMPLE)], tokenizer(), **options)


# ---- item 24: --criterion ablation on a first-order profile names the fix that works ----------

@pytest.mark.parametrize("criterion", ["ablation", "ablation-kl"])
def test_exact_ablation_criterion_on_a_first_order_profile(criterion, inputs, tmp_path):
    runner, prof = CliRunner(), tmp_path / "fo"
    made = runner.invoke(app, [str(a) for a in (
        "profile", inputs["model"], *DATA, "--max-tokens", "128", "--seq-len", "32", "--device",
        "cpu", "--no-plots", "--ablation", "--ablation-method", "first-order", "--out", prof)])
    assert made.exit_code == 0, made.output
    result = runner.invoke(app, [str(a) for a in (
        "prune", inputs["model"], "--stats", prof, "--criterion", criterion, "--ratio", "0.5",
        "--dry-run")])
    assert result.exit_code == 2, result.output
    assert "re-run `moekit profile MODEL --ablation --ablation-method exact --out DIR`" in \
        result.stderr and "or use --criterion ablation-fo" in result.stderr, result.stderr
