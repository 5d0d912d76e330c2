"""Start-up cost: the light commands (`--version`, `--help`, `inspect`, a stats-only `prune`)
never import the heavy libraries, which cost 0.1-3 s of CPU each before any work starts (numpy
alone about 0.13 s, torch/transformers seconds); and the plain-Python percentile that lets
prune plan without numpy agrees with numpy's."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prune_support import write_synthetic_stats

from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.stats.criteria import percentile

HEAVY = ("torch", "pandas", "numpy", "transformers", "matplotlib", "scipy", "safetensors",
         "pyarrow", "huggingface_hub")
# Runs the CLI entry point in a fresh interpreter, then prints the heavy modules it imported.
DRIVER = f"""
import sys
from moekit.cli.app import main
sys.argv = ["moekit", *sys.argv[1:]]
try:
    main()
except SystemExit as done:
    code = done.code
print("LOADED", *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
sys.exit(code)
"""


def run_driver(*args: object) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-c", DRIVER, *map(str, args)], capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr
    return run


def imported_heavy(*args: object) -> list[str]:
    line = next(x for x in run_driver(*args).stderr.splitlines() if x.startswith("LOADED"))
    return line.split()[1:]


@pytest.fixture(scope="module")
def model_and_stats(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    model = tiny_checkpoint("mixtral")
    layout = describe(Checkpoint(model))
    tokens = {layer.index: [float(j + 1) for j in range(layer.num_experts)]
              for layer in layout.moe_layers}
    return model, write_synthetic_stats(tmp_path_factory.mktemp("stats"), model, tokens)


def test_progress_leaves_nothing_on_a_redirected_stderr(model_and_stats, tmp_path):
    """Not a terminal: no progress bar, and no blank line where a transient one was cleared."""
    model, stats = model_and_stats
    run = run_driver("prune", model, "--stats", stats, "--ratio", "0.5", "--out", tmp_path / "o")
    assert run.stderr.splitlines() == ["LOADED"], repr(run.stderr)
    assert "wrote" in run.stdout


@pytest.mark.parametrize("args", [
    ["--version"], ["--help"], ["prune", "--help"], ["inspect", "{m}"],
    ["inspect", "{m}", "--json"],
    ["prune", "{m}", "--stats", "{s}", "--ratio", "0.5", "--criterion", "reap", "--dry-run"],
    ["prune", "{m}", "--stats", "{s}", "--ratio", "0.5", "--criterion", "reap", "--out", "{o}"],
])
def test_light_commands_import_no_heavy_library(args, model_and_stats, tmp_path):
    model, stats = model_and_stats
    out = tmp_path / "out"
    loaded = imported_heavy(*[a.format(m=model, s=stats, o=out) for a in args])
    assert loaded == [], f"moekit {' '.join(args[:2])} imported {loaded}"
    if "--out" in args:
        assert Checkpoint(out).tensors  # the prune really ran and wrote its output


def test_the_driver_would_see_a_heavy_import(model_and_stats, tmp_path):
    """The check can fail: a prune that writes its budget table as Parquet needs pandas."""
    model, stats = model_and_stats
    loaded = imported_heavy("prune", model, "--stats", stats, "--ratio", "0.5", "--dry-run",
                            "--export", tmp_path / "budget.parquet")
    assert "pandas" in loaded


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 3, 7, 64, 1000):
        values = sorted(rng.lognormvariate(0, 2) for _ in range(n))
        for q in (0, 12.5, 50, 99.5, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)),
                                                          rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("args", "loaded"), [
    (["prune", "--help"], ["prune_cmd"]), (["--debug", "inspect", "--help"], ["inspect_cmd"]),
    (["stats", "show", "--help"], ["stats_cmd"]),
    (["--help"], ["convert_cmd", "eval_cmd", "inspect_cmd", "merge_cmd", "profile_cmd",
                  "prune_cmd", "stats_cmd", "upcycle_cmd"])])
def test_the_entry_point_builds_only_the_command_it_runs(args, loaded):
    """Converting every command's options costs start-up; `main()` imports one command module
    (all of them for the top-level help, whose listing needs them)."""
    code = ("import sys\nfrom moekit.cli.app import main\nsys.argv = ['moekit', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('CMDS', *sorted(m.rsplit('.', 1)[1] for m in sys.modules "
            "if m.startswith('moekit.cli.') and m.endswith('_cmd')), file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    line = next(x for x in run.stderr.splitlines() if x.startswith("CMDS"))
    assert line.split()[1:] == loaded, run.stderr
    assert "Usage:" in run.stdout
