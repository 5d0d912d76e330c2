"""Model sources: local folders, and Hub repo ids resolved offline from a local Hub cache laid
out the way huggingface_hub documents it (models--org--name/{refs,snapshots,blobs})."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import ModelSourceError
from moekit.io.source import resolve_source

MAIN = "a" * 40
V2 = "b" * 40


def add_snapshot(repo: Path, commit: str, source: Path, use_blobs: bool) -> Path:
    """Place `source`'s files under snapshots/<commit>/ (as symlinks into blobs/ if asked)."""
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if not path.is_file():
            continue
        if use_blobs:
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(path, blob)
            (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
        else:
            shutil.copyfile(path, snapshot / path.name)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_checkpoint) -> Path:
    """A cache holding `org/tiny`: main = tiny mixtral, tag v2 = tiny qwen3_moe; offline."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    add_snapshot(repo, MAIN, tiny_checkpoint("mixtral"), use_blobs=True)
    add_snapshot(repo, V2, tiny_checkpoint("qwen3_moe"), use_blobs=False)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables once, at import: patch its constants as well.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so that "org/tiny" is not a relative folder by accident
    return repo


def test_local_folder_is_returned_as_is(tiny_checkpoint):
    folder = tiny_checkpoint("mixtral")
    assert resolve_source(folder) == folder
    assert resolve_source(str(folder)) == folder


@pytest.mark.parametrize("make", ["file", "missing", "bad-id"])
def test_bad_local_paths(make, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if make == "file":
        (tmp_path / "weights.bin").write_bytes(b"x")
        model, expected = "weights.bin", "is a file, not a checkpoint folder"
    elif make == "missing":
        model, expected = str(tmp_path / "nope" / "model"), "does not exist"
    else:
        model, expected = "not a repo id", "does not exist"
    with pytest.raises(ModelSourceError, match=expected) as err:
        resolve_source(model)
    assert "\n" not in str(err.value)


def test_hub_repo_from_offline_cache(hub_cache):
    folder = resolve_source("org/tiny")
    assert folder.resolve() == (hub_cache / "snapshots" / MAIN).resolve()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mixtral"


@pytest.mark.parametrize(("revision", "commit", "model_type"), [
    ("main", MAIN, "mixtral"), ("v2", V2, "qwen3_moe"), (V2, V2, "qwen3_moe"),
])
def test_revision_is_honoured(hub_cache, revision, commit, model_type):
    folder = resolve_source("org/tiny", revision=revision)
    assert folder.resolve() == (hub_cache / "snapshots" / commit).resolve()
    assert json.loads((folder / "config.json").read_text())["model_type"] == model_type


@pytest.mark.parametrize(("model", "revision"), [("org/unknown", None), ("org/tiny", "v9")])
def test_unknown_repo_or_revision_offline(hub_cache, model, revision):
    with pytest.raises(ModelSourceError) as err:
        resolve_source(model, revision=revision)
    message = str(err.value)
    assert model in message and "Hub cache" in message and "\n" not in message
    if revision:
        assert revision in message


def test_cli_inspects_a_cached_repo(hub_cache):
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", "org/tiny", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["family"] == "mixtral"
    result = runner.invoke(app, ["inspect", "org/tiny", "--revision", "v2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["family"] == "qwen3_moe"
    result = runner.invoke(app, ["inspect", "org/absent"])
    assert result.exit_code != 0
    assert "org/absent" in result.stderr and len(result.stderr.strip().splitlines()) == 1
