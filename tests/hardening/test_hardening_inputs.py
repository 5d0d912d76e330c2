"""Issue 24 (hostile probes): every side file goes through one checked path, no input is equal
to or inside `--out`, non-regular files and empty `--data` paths are refused, option values are
checked before any work, and stats folders are read whole. Each refusal is one line, exit 2, and
nothing is written or deleted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hardening_support import MERGE, SAMPLE, one_line, run, snapshot

# ---- item 13: merge's side file goes through check_outputs ----------------------------------

@pytest.mark.parametrize("where", ["model", "stats"])
def test_merge_plan_out_inside_an_input_is_refused(where, model, stats):
    target = (model / "config.json") if where == "model" else (stats / "metadata.json")
    before = target.read_bytes()
    result = run(MERGE[0], model, "--stats", stats, *MERGE[1:], "--dry-run", "--plan-out",
                 target)
    one_line(result, "is inside the input")
    assert target.read_bytes() == before


def test_merge_plan_out_extension_is_checked(model, stats, tmp_path):
    result = run(MERGE[0], model, "--stats", stats, *MERGE[1:], "--dry-run", "--plan-out",
                 tmp_path / "plan.txt")
    one_line(result, "cannot write a '.txt' file")
    assert not (tmp_path / "plan.txt").exists()


def test_merge_plan_out_inside_out_is_refused_before_writing(model, stats, tmp_path):
    out = tmp_path / "out"
    result = run(MERGE[0], model, "--stats", stats, *MERGE[1:], "--out", out, "--plan-out",
                 out / "plan.json")
    one_line(result, "is inside the output folder")
    assert not out.exists()


# ---- item 16: no input equal to or inside --out ---------------------------------------------

def test_prune_data_folder_as_out_is_never_deleted(model, data_dir):
    before = snapshot(data_dir)
    result = run("prune", model, "--data", f"fr={data_dir}", "--ratio", "0.5", "--out",
                 data_dir, "--overwrite")
    one_line(result, "overlaps the input")
    assert snapshot(data_dir) == before


@pytest.mark.parametrize("which", ["stats", "data"])
def test_merge_input_as_out_is_never_deleted(which, model, stats, data_dir):
    folder = stats if which == "stats" else data_dir
    before = snapshot(folder)
    result = run(MERGE[0], model, "--stats", stats, *MERGE[1:], "--data", f"fr={data_dir}",
                 "--out", folder, "--overwrite")
    one_line(result, "overlaps the input")
    assert snapshot(folder) == before


def test_merge_out_inside_a_data_folder_is_refused(model, stats, data_dir):
    result = run(MERGE[0], model, "--stats", stats, *MERGE[1:], "--data", f"fr={data_dir}",
                 "--out", data_dir / "sub")
    one_line(result, "overlaps the input")
    assert not (data_dir / "sub").exists()


def test_upcycle_data_folder_as_out_is_never_deleted(tiny_checkpoint, data_dir):
    before = snapshot(data_dir)
    result = run("upcycle", tiny_checkpoint("llama"), "-e", "4", "--router", "data", "--data",
                 f"fr={data_dir}", "--out", data_dir, "--overwrite")
    one_line(result, "overlaps the input")
    assert snapshot(data_dir) == before


def test_profile_data_and_merge_with_as_out_are_never_deleted(model, stats, data_dir):
    for args, folder in [(("--data", f"fr={data_dir}"), data_dir), (("--merge-with", stats),
                                                                      stats)]:
        before = snapshot(folder)
        result = run("profile", model, *args, "--out", folder, "--overwrite")
        one_line(result, "overlaps the input")
        assert snapshot(folder) == before


# ---- item 14 (and 24): a stats folder is read whole ----------------------------------------

def test_prune_refuses_a_truncated_expert_stats_csv(model, stats, tmp_path):
    csv = stats / "expert_stats.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:10]))
    result = run("prune", model, "--stats", stats, "--ratio", "0.25", "--out", tmp_path / "o")
    one_line(result, "expert_stats.csv has 9 rows where metadata.json describes 16")
    assert "truncated or edited" in result.stderr and not (tmp_path / "o").exists()


def test_prune_refuses_a_repeated_row(model, stats, tmp_path):
    csv = stats / "expert_stats.csv"
    lines = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join([*lines, lines[1]]))
    result = run("prune", model, "--stats", stats, "--ratio", "0.25", "--out", tmp_path / "o")
    one_line(result, "the row of layer 0 expert 0 domain 'all' 2 times")
    assert not (tmp_path / "o").exists()


def test_stats_show_refuses_an_incomplete_parquet(tmp_path):
    import numpy as np
    from synthetic_profile import synthetic_profile

    from moekit.stats.profile_io import EXPERT_FILE, save_profile

    profile, _ = synthetic_profile([np.ones(4)] * 2, k=2, tokens=64)
    folder = tmp_path / "prof"
    folder.mkdir()
    save_profile(profile, folder)
    profile.expert_stats.iloc[:5].to_parquet(folder / EXPERT_FILE, index=False)
    one_line(run("stats", "show", folder), "expert_stats.parquet has 5 rows where")


@pytest.mark.parametrize("content", ["5", "[1, 2]", '"x"'])
def test_metadata_that_is_not_an_object_is_one_line(content, model, stats, tmp_path):
    (stats / "metadata.json").write_text(content)
    result = run("prune", model, "--stats", stats, "--ratio", "0.25", "--out", tmp_path / "o")
    one_line(result, "not an object")


def test_string_moe_layers_is_one_line(model, stats, tmp_path):
    import json

    meta = json.loads((stats / "metadata.json").read_text())
    (stats / "metadata.json").write_text(json.dumps({**meta, "moe_layers": "ab"}))
    result = run("prune", model, "--stats", stats, "--ratio", "0.25", "--out", tmp_path / "o")
    one_line(result, "malformed moe_layers")


def test_truncated_parquet_is_one_line(model, stats, tmp_path):
    (stats / "expert_stats.csv").unlink()
    parquet = stats / "expert_stats.parquet"
    parquet.write_bytes(parquet.read_bytes()[:200])
    result = run("prune", model, "--stats", stats, "--ratio", "0.25", "--out", tmp_path / "o")
    one_line(result, "expert_stats.parquet is not a readable Parquet file")
    assert "ArrowInvalid" not in result.output


# ---- items 17, 18: non-regular files, empty --data paths ------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    import moekit.runtime.engine as engine

    monkeypatch.setattr(engine, "open_model", lambda *a, **k: pytest.fail("model loaded"))


def bounded(*args: object, seconds: int = 20):
    """The CLI run, failed (not hung) when it blocks past `seconds` (SIGALRM)."""
    import signal

    def expire(signum, frame):  # noqa: ARG001
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return run(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifo_as_data_is_refused(model, tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    result = bounded("eval", model, "--data", f"d={fifo}", "--max-tokens", "64")
    one_line(result, "is a FIFO (named pipe), not a regular file")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_fifo_in_the_model_folder_is_refused(name, model, no_model_load):
    (model / name).unlink()
    os.mkfifo(model / name)
    command = ("eval", model) if name == "tokenizer.json" else ("inspect", model)
    one_line(bounded(*command), f"{name} is a FIFO (named pipe), not a regular file")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_config_linked_to_dev_zero_is_refused_unread(model, no_model_load):
    (model / "config.json").unlink()
    (model / "config.json").symlink_to("/dev/zero")
    one_line(bounded("inspect", model, seconds=10), "config.json is a character device")


def test_tokenizer_folder_with_a_fifo_is_refused(model, tmp_path, no_model_load):
    folder = tmp_path / "tok"
    folder.mkdir()
    os.mkfifo(folder / "tokenizer.json")
    result = bounded("eval", model, "--tokenizer", folder, "--data", f"d={SAMPLE}")
    one_line(result, "tokenizer.json is a FIFO")


@pytest.mark.parametrize("value", ["x=", "x=  ", ""])
@pytest.mark.parametrize("command", ["eval", "profile", "prune", "merge"])
def test_empty_data_path_is_refused(command, value, model, tmp_path, monkeypatch,
                                    no_model_load):
    here = tmp_path / "here"
    here.mkdir()
    (here / "secret.txt").write_text("never read this " * 100)
    monkeypatch.chdir(here)
    extra = {"eval": (), "profile": ("--out", tmp_path / "p"),
             "prune": ("--ratio", "0.5", "--out", tmp_path / "p"),
             "merge": ("--ratio", "0.5", "--out", tmp_path / "p")}[command]
    result = bounded(command, model, "--data", value, *extra)
    one_line(result, "the path is empty")
    assert not (tmp_path / "p").exists()


# ---- items 20, 24: option values refused before any work ------------------------------------

def command_args(command: str, model: Path, tmp_path: Path) -> tuple:
    data = ("--data", f"d={SAMPLE}")
    return {"prune": ("prune", model, *data, "--ratio", "0.5", "--out", tmp_path / "o"),
            "merge": ("merge", model, *data, "--ratio", "0.5", "--out", tmp_path / "o"),
            "profile": ("profile", model, *data, "--out", tmp_path / "o"),
            "eval": ("eval", model, *data)}[command]


@pytest.mark.parametrize("value", ["0", "-5", "1", "63"])
@pytest.mark.parametrize("command", ["prune", "merge"])
def test_calibration_max_tokens_below_the_minimum(command, value, model, tmp_path,
                                                  no_model_load):
    result = run(*command_args(command, model, tmp_path), "--max-tokens", value)
    one_line(result, f"--max-tokens must be at least 64, got {value}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option, value, minimum", [
    ("--refit-tokens", "0", 64), ("--refit-tokens", "-1", 64),
    ("--reconstruct-steps", "-1", 0)])
def test_prune_refit_options_refused_up_front(option, value, minimum, model, tmp_path,
                                              no_model_load):
    result = run(*command_args("prune", model, tmp_path), option, value)
    one_line(result, f"{option} must be at least {minimum}, got {value}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["prune", "merge", "profile", "eval"])
def test_huge_max_memory_is_one_line(command, model, tmp_path, no_model_load):
    result = run(*command_args(command, model, tmp_path), "--max-memory", "9" * 401)
    one_line(result, "--max-memory '99999999999999999999...' is too large")
    assert "OverflowError" not in result.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["prune", "merge", "profile", "eval"])
def test_unknown_device_is_one_line(command, model, tmp_path, no_model_load):
    result = run(*command_args(command, model, tmp_path), "--device", "tpu")
    one_line(result, "--device 'tpu' is not a device moekit can run on")
    assert not (tmp_path / "o").exists()


def test_pick_device_turns_torchs_error_into_one_line():
    from moekit.errors import InvalidArgumentError
    from moekit.runtime.loading import pick_device

    with pytest.raises(InvalidArgumentError, match="not a device torch knows"):
        pick_device("tpu")


# ---- item 21: eval --ref with another vocabulary ---------------------------------------------

def test_eval_ref_with_another_vocabulary_size(model, tiny_checkpoint, no_model_load):
    ref = tiny_checkpoint("mixtral", vocab_size=320)
    result = run("eval", model, "--ref", ref, "--data", f"d={SAMPLE}", "--max-tokens", "64")
    one_line(result, "has a vocabulary of 320 tokens but")


def test_eval_ref_with_another_tokenizer(model, tmp_path, no_model_load):
    import json

    ref = Path(shutil.copytree(model, tmp_path / "ref"))
    spec = json.loads((ref / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (ref / "tokenizer.json").write_text(json.dumps(spec))
    result = run("eval", model, "--ref", ref, "--data", f"d={SAMPLE}", "--max-tokens", "64")
    one_line(result, "has another tokenizer than")


@pytest.mark.parametrize("which", ["plan", "drop", "stats"])
def test_fifo_as_plan_list_or_stats_file_is_refused(which, model, stats, tmp_path,
                                                    no_model_load):
    fifo = {"plan": tmp_path / "plan.json", "drop": tmp_path / "drop.txt",
            "stats": stats / "metadata.json"}[which]
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    option = {"plan": ("--plan", fifo), "drop": ("--drop", fifo),
              "stats": ("--stats", stats, "--ratio", "0.5")}[which]
    result = bounded("prune", model, *option, "--out", tmp_path / "o")
    one_line(result, f"input file {fifo} is a FIFO (named pipe)")
    assert not (tmp_path / "o").exists()
