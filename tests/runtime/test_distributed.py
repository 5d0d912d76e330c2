"""Data-parallel runs: `torchrun --nproc-per-node 2 -m moekit profile|eval` on CPU (gloo) against
the single-process run of the same command, a rank failure, and the sharding rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import InvalidArgumentError
from moekit.runtime.distributed import dist_context, shard_for_rank

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--seq-len", "32", "--max-tokens", "300", "--batch-size", "3", "--device", "cpu"]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> list[str]:
    """Three `name=path` data sources of stdlib docstrings; 4 batches each with FAST, so two
    ranks split the 12 batches inside the second source."""
    import collections
    import json as json_module

    folder = tmp_path_factory.mktemp("dist-texts")
    out = []
    for name, module in (("osdoc", os), ("jsondoc", json_module), ("coll", collections)):
        docs = [getattr(module, a).__doc__ or "" for a in dir(module) if not a.startswith("_")]
        path = folder / f"{name}.txt"
        path.write_text((module.__doc__ or "") + "\n".join(d for d in docs if d)[:6000])
        out.append(f"{name}={path}")
    return out


def data_args(sources: list[str]) -> list[str]:
    return sum((["--data", s] for s in sources), [])


def torchrun(*args: object, nproc: int = 2, entry: tuple[str, ...] = ("-m", "moekit"),
             env: dict[str, str] | None = None,
             launcher: tuple[str, ...] = ("-m", "torch.distributed.run"), wait: bool = True
             ) -> subprocess.CompletedProcess | subprocess.Popen:
    """`torchrun --standalone` (a free port chosen by the launcher) on this checkout; with
    `wait=False`, the running launcher (text pipes)."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", USE_HUB_KERNELS="0",
                    TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **(env or {}))
    command = [sys.executable, *launcher, "--standalone", f"--nproc-per-node={nproc}", *entry,
               *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def failure(run: subprocess.CompletedProcess) -> str:
    """The children's own messages (before torchrun's summary) for an assertion message."""
    return run.stderr.split("Traceback (most recent call last):")[0][-4000:]


def single(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 12])
def test_shards_are_disjoint_covering_and_balanced(n: int, world: int) -> None:
    items = list(range(100, 100 + n))
    shares = [shard_for_rank(items, rank, world) for rank in range(world)]
    assert [x for share in shares for x in share] == items  # disjoint, covering, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shard_for_rank(items) == items  # outside torchrun: rank 0 of 1 keeps everything
    assert dist_context().world_size == 1


def test_shard_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(InvalidArgumentError, match="outside"):
        shard_for_rank([1, 2, 3], 2, 2)


def test_two_ranks_profile_like_one_process(tiny_checkpoint, texts, tmp_path) -> None:
    model = tiny_checkpoint("qwen3_moe")
    one, two = tmp_path / "one", tmp_path / "two"
    single("profile", model, "--out", one, *data_args(texts), *FAST, "--trace", "--no-plots")
    run = torchrun("profile", model, "--out", two, *data_args(texts), *FAST, "--trace",
                   "--no-plots")
    assert run.returncode == 0, failure(run)
    assert run.stdout.count(f"wrote {two}") == 1  # rank 0 alone prints
    assert not list(tmp_path.glob(".two*"))  # no staging folder of another rank

    a, b = (pd.read_parquet(d / "expert_stats.parquet") for d in (one, two))
    assert a.tokens.dtype == b.tokens.dtype == np.int64
    assert a.tokens.sum() > 0 and (a.tokens.to_numpy() == b.tokens.to_numpy()).all()
    for column in ("weight_sum", "ean_sum", "reap_sum", "max_norm"):
        np.testing.assert_allclose(b[column], a[column], rtol=1e-5, atol=1e-6)
    la, lb = (pd.read_csv(d / "layer_stats.csv") for d in (one, two))
    for column in ("tokens", "slots", "top1_pairs", "top1_repeats", "dead_experts"):
        assert (la[column] == lb[column]).all(), column
    np.testing.assert_allclose(lb.entropy_sum, la.entropy_sum, rtol=1e-5)
    ca, cb = (np.load(d / "coactivation.npz") for d in (one, two))
    assert sorted(ca) == sorted(cb) and all((ca[k] == cb[k]).all() for k in ca)
    wa, wb = (np.load(d / "windows.npz") for d in (one, two))  # gathered in rank order
    assert sorted(wa) == sorted(wb) and len(wa) > 0
    for key in wa:
        if key.endswith("/tokens"):
            assert wa[key].dtype == np.int32 and (wa[key] == wb[key]).all(), key
        else:
            np.testing.assert_allclose(wb[key], wa[key], rtol=1e-4, atol=1e-5)
    ta, tb = (load_file(str(d / "trace.safetensors")) for d in (one, two))
    assert sorted(ta) == sorted(tb)
    for key in ta:  # rank-order concatenation restores the single-process token order
        if key.endswith("/weights"):
            np.testing.assert_allclose(tb[key], ta[key], rtol=1e-5, atol=1e-6)
        else:
            assert (ta[key] == tb[key]).all(), key
    meta = json.loads((two / "metadata.json").read_text())
    assert meta["ranks"] == 2 and meta["domains"] == json.loads(
        (one / "metadata.json").read_text())["domains"]


def _eval_json(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def test_two_ranks_eval_like_one_process(tiny_checkpoint, texts) -> None:
    model, ref = tiny_checkpoint("qwen3_moe"), tiny_checkpoint("qwen3_moe", seed=3)
    args = ("eval", model, "--ref", ref, *data_args(texts), *FAST, "--json")
    expected = _eval_json(single(*args))
    run = torchrun(*args)
    assert run.returncode == 0, failure(run)
    got = _eval_json(run.stdout)  # one JSON document: rank 1 prints nothing
    for want, row in zip([*expected["domains"], expected["overall"]],
                         [*got["domains"], got["overall"]], strict=True):
        assert row["tokens"] == want["tokens"] > 0
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert row["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
        assert row["top1"] == pytest.approx(want["top1"], abs=1.5 / want["tokens"])


def test_a_rank_without_batches_still_joins(tiny_checkpoint, texts) -> None:
    """One window in all: rank 1 has nothing to run and contributes zeros."""
    model = tiny_checkpoint("qwen3_moe")
    args = ("eval", model, "--data", texts[0], "--seq-len", "16", "--max-tokens", "16",
            "--device", "cpu", "--json")
    expected = _eval_json(single(*args))
    run = torchrun(*args)
    assert run.returncode == 0, failure(run)
    got = _eval_json(run.stdout)
    assert got["overall"]["tokens"] == expected["overall"]["tokens"] == 15
    assert got["overall"]["loss"] == pytest.approx(expected["overall"]["loss"], rel=1e-5)


def _failing(target: str, rank: int, after: int) -> tuple[tuple[str, ...], dict[str, str]]:
    entry = (str(ROOT / "tests" / "dist_failing_entry.py"),)
    return entry, {"FAIL_RANK": str(rank), "FAIL_TARGET": target, "FAIL_AFTER": str(after)}


def test_a_failing_rank_stops_all_and_nothing_is_written(tiny_checkpoint, texts,
                                                          tmp_path) -> None:
    """Rank 1 raises at its third batch, while rank 0 still computes."""
    entry, env = _failing("moekit.calib.recorder:Recorder.set_batch", rank=1, after=2)
    out = tmp_path / "prof"
    run = torchrun("profile", tiny_checkpoint("qwen3_moe"), "--out", out, *data_args(texts),
                   *FAST, "--no-plots", entry=entry, env=env)
    assert run.returncode != 0
    message = "error: rank 1 of 2 failed: RuntimeError: injected failure on call 3"
    assert run.stderr.count(message) == 1, run.stderr[-3000:]
    assert "nothing was written" in run.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_rank_zero_failing_in_eval_names_rank_zero(tiny_checkpoint, texts, tmp_path) -> None:
    entry, env = _failing("moekit.ops.evaluate:_logprobs", rank=0, after=1)
    export = tmp_path / "table.csv"
    run = torchrun("eval", tiny_checkpoint("qwen3_moe"), *data_args(texts), *FAST,
                   "--export", export, entry=entry, env=env)
    assert run.returncode != 0
    assert run.stderr.count("error: rank 0 of 2 failed: RuntimeError: injected failure") == 1
    assert not export.exists()


def test_a_killed_rank_stops_all_and_nothing_is_written(tiny_checkpoint, texts,
                                                        tmp_path) -> None:
    """Rank 1 dies without reporting (os._exit, as under the OOM killer): torchrun stops rank
    0 (or rank 0's next collective fails first), and no output appears."""
    entry, env = _failing("moekit.calib.recorder:Recorder.set_batch", rank=1, after=2)
    out = tmp_path / "prof"
    run = torchrun("profile", tiny_checkpoint("qwen3_moe"), "--out", out, *data_args(texts),
                   *FAST, "--no-plots", entry=entry, env={**env, "FAIL_MODE": "exit"})
    assert run.returncode != 0
    assert "exitcode  : 9" in run.stderr, failure(run)  # torchrun's summary lists rank 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert all("lost the other ranks" in line for line in errors), failure(run)
    assert "MarkupError" not in run.stderr  # if rank 0 reports the lost peer, in one line
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---- issue 24 item 23: a failed or stopped torchrun run ends in one line, with a clean code ---

def quiet_torchrun(*args: object, **kw: object) -> subprocess.CompletedProcess:
    """`torchrun` through moekit's quiet launcher (moekit.cli.torchrun), same arguments."""
    return torchrun(*args, launcher=("-m", "moekit.cli.torchrun"), **kw)


def test_quiet_launcher_ends_a_refused_command_in_one_line(tiny_checkpoint, tmp_path) -> None:
    run = quiet_torchrun("prune", tiny_checkpoint("qwen3_moe"), "--ratio", "0.5", "--out",
                         tmp_path / "o")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: moekit prune does not run data-parallel, but torchrun started it on 2 processes"
        " (WORLD_SIZE) (run it as one process: python -m moekit ...; only profile and eval "
        "split their data across torchrun ranks)"], run.stderr


def test_quiet_launcher_ends_a_rank_failure_in_one_line(tiny_checkpoint, texts,
                                                        tmp_path) -> None:
    entry, env = _failing("moekit.calib.recorder:Recorder.set_batch", rank=1, after=2)
    run = quiet_torchrun("profile", tiny_checkpoint("qwen3_moe"), "--out", tmp_path / "p",
                         *data_args(texts), *FAST, "--no-plots", entry=entry, env=env)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()  # moekit's own "in memory: ..." line first
    assert lines[-1].startswith("error: rank 1 of 2 failed: RuntimeError: injected failure")
    assert len(lines) == 2 and "Traceback" not in run.stderr, run.stderr


def test_sigterm_stops_every_rank_with_one_line(tiny_checkpoint, texts, tmp_path) -> None:
    """SIGTERM to the launcher while both ranks compute: it stops them; rank 0 alone says
    "interrupted", no traceback, exit 128 + 15, nothing written."""
    import signal
    import time

    entry, env = _failing("moekit.calib.recorder:Recorder.set_batch", rank=-1, after=1)
    mark = tmp_path / "mark"
    env.update(FAIL_RANK="all", FAIL_MODE="sleep", FAIL_MARK=str(mark))
    out = tmp_path / "p"
    launcher = torchrun("profile", tiny_checkpoint("qwen3_moe"), "--out", out,
                        *data_args(texts), *FAST, "--no-plots", entry=entry, env=env,
                        launcher=("-m", "moekit.cli.torchrun"), wait=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not all(Path(f"{mark}.{r}").exists() for r in (0, 1)):
        assert launcher.poll() is None, launcher.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    assert launcher.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.count("interrupted (SIGTERM)") == 1, stderr
    assert "Traceback" not in stderr and not out.exists(), stderr
    assert not [line for line in stderr.splitlines()  # nothing from the launcher either
                if not line.startswith(("in memory", "interrupted"))], stderr


def test_quiet_launcher_exit_codes() -> None:
    from types import SimpleNamespace as Failure

    from moekit.cli.torchrun import outcome

    assert outcome({0: Failure(exitcode=2, timestamp=2), 1: Failure(exitcode=1, timestamp=1)}) \
        == (2, None)  # rank 0 printed the run's line
    assert outcome({1: Failure(exitcode=1, timestamp=1)}) == (2, None)
    assert outcome({1: Failure(exitcode=-15, timestamp=1), 0: Failure(exitcode=2, timestamp=2)}) \
        == (2, None)  # rank 1 was stopped by torchrun after rank 0 exited with the error
    assert outcome({1: Failure(exitcode=-15, timestamp=1), 2: Failure(exitcode=1, timestamp=2)}) \
        == (2, None)
    assert outcome({0: Failure(exitcode=143, timestamp=1)}) == (143, None)
    assert outcome({1: Failure(exitcode=9, timestamp=1), 0: Failure(exitcode=-15, timestamp=2)}) \
        == (9, "error: rank 1 exited with code 9 unannounced (every rank stopped; nothing was "
            "written)")
    assert outcome({1: Failure(exitcode=-9, timestamp=1)})[0] == 137
