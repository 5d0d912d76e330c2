"""moekit.runtime budgets: the memory/stream/expert-group decision, expert groups equal the
whole layer, one-line errors for a budget below the smallest unit and a full spill disk."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from support import SETTINGS, assert_same_profile, budgeted, sources, spec  # noqa: F401
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import InvalidArgumentError
from moekit.ops.evaluate import evaluate
from moekit.ops.profile import profile_model
from moekit.runtime.budget import Sizes, decide
from moekit.runtime.engine import open_model
from moekit.runtime.hidden import SpillError
from moekit.units import parse_size

GROUP_FAMILIES = ["mixtral", "deepseek_v3", "qwen2_moe", "gpt_oss", "qwen3_next"]


def group_budget(folder, experts: int) -> int:
    """Bytes that hold the embeddings, the largest layer base and `experts` experts."""
    sizes = open_model(folder, device="cpu", stream=True).sizes
    base = max(b for b, e in zip(sizes.bases, sizes.expert, strict=True) if e)
    return sizes.resident + base + experts * max(sizes.expert)


def test_parse_size():
    assert parse_size("700MB") == 700 * 10**6
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("123") == 123
    assert parse_size(" 2 tb ") == 2 * 10**12 and parse_size("512Mi") == 512 * 2**20
    assert parse_size("64KiB") == 64 * 2**10 and parse_size("5G") == 5 * 10**9
    for bad in ("lots", "GB", "iB", "5XB", "-5GB", "5 GB extra"):
        with pytest.raises(InvalidArgumentError, match="--max-shard-size .* is not a size"):
            parse_size(bad, "--max-shard-size")
    with pytest.raises(InvalidArgumentError, match="--max-memory must be positive"):
        parse_size("0MB")


def test_decision_arithmetic():
    sizes = Sizes(total=1000, resident=100, layers=(300, 300), bases=(60, 60), expert=(30, 30))
    assert decide(sizes, 1000, "cpu").mode == "memory"
    whole = decide(sizes, 700, "cuda")
    assert (whole.mode, whole.prefetch, whole.group) == ("stream", True, 0)
    # on CPU a second layer in memory would double the peak: the page cache reads ahead instead
    assert (decide(sizes, 700, "cpu").mode, decide(sizes, 700, "cpu").prefetch) == ("stream",
                                                                                   False)
    assert decide(sizes, 400, "cuda").prefetch is False
    grouped = decide(sizes, 250, "cpu")
    assert grouped.group == (250 - 100 - 60) // 30
    with pytest.raises(InvalidArgumentError, match=r"smallest unit .*190 B.*use --max-memory 190B"):
        decide(sizes, 189, "cpu")


@pytest.mark.parametrize("model_type", GROUP_FAMILIES)
def test_expert_groups_give_the_same_profile_and_loss(model_type, tiny_checkpoint, sources):  # noqa: F811
    folder = tiny_checkpoint(model_type)
    budget = group_budget(folder, 3)
    memory = profile_model(folder, spec(sources), stream=False, **SETTINGS)
    grouped = profile_model(folder, spec(sources), **budgeted(budget))
    assert grouped.metadata["runtime"]["expert_group"] == 3
    assert_same_profile(grouped, memory)
    if model_type == "mixtral":  # hidden states, expert inputs and outputs spilled to a file
        spilled = profile_model(folder, spec(sources), hidden_ram=0, **budgeted(budget))
        assert spilled.metadata["runtime"]["hidden_states"].startswith("spilled")
        assert_same_profile(spilled, memory)
    loss = evaluate(folder, spec(sources), stream=False, **SETTINGS).overall.loss
    assert evaluate(folder, spec(sources), **budgeted(budget)).overall.loss == \
        pytest.approx(loss, abs=1e-4)


def test_budget_below_the_smallest_unit_is_one_line(tiny_checkpoint, tmp_path, sources):  # noqa: F811
    folder = tiny_checkpoint("mixtral")
    smallest = group_budget(folder, 1)
    result = CliRunner().invoke(app, ["profile", str(folder), "--out", str(tmp_path / "p"),
                                      "--data", f"a={sources[0].path}", "--device", "cpu",
                                      "--max-memory", str(smallest - 1000), "--no-plots"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "smallest unit" in line and "--max-memory" in line
    assert not (tmp_path / "p").exists()
    ok = open_model(folder, device="cpu", max_memory=smallest)
    assert ok.plan.group == 1


def test_cli_reports_the_streamed_mode(tiny_checkpoint, tmp_path, sources):  # noqa: F811
    folder = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "p"
    result = CliRunner().invoke(app, ["profile", str(folder), "--out", str(out), "--data",
                                      f"a={sources[0].path}", "--seq-len", "24", "--device",
                                      "cpu", "--max-memory", "300KB", "--no-plots"])
    assert result.exit_code == 0, result.output
    runtime = json.loads((out / "metadata.json").read_text())["runtime"]
    assert runtime["mode"] == "stream" and "exceeds --max-memory 300.00 KB" in runtime["reason"]
    assert "streamed layer by layer" in result.output


def test_full_disk_while_spilling_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    folder = tiny_checkpoint("mixtral")
    spill = tmp_path / "spill"
    spill.mkdir()
    engine = open_model(folder, device="cpu", stream=True, hidden_ram=0, spill_dir=str(spill))
    calls = []

    def full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    monkeypatch.setattr(os, "pwrite", full)
    batches = [torch.randint(3, 256, (2, 16)) for _ in range(3)]
    with pytest.raises(SpillError, match="No space left on device") as err:
        list(engine.run(batches))
    assert "\n" not in str(err.value) and "TMPDIR" in str(err.value)
    assert list(spill.iterdir()) == []


def test_without_room_for_two_layers_the_next_one_is_only_hinted(tiny_checkpoint, sources,  # noqa: F811
                                                                 monkeypatch):
    """A budget that holds one layer: no second layer in memory, the next layer's byte ranges
    go to the page cache (WILLNEED) while the current one runs; the profile is unchanged."""
    from moekit.runtime import weights

    folder = tiny_checkpoint("mixtral")
    sizes = open_model(folder, device="cpu", stream=True).sizes
    budget = sizes.resident + max(sizes.layers) + 1
    advised: list[str] = []
    original = weights.WeightMap.advise
    monkeypatch.setattr(weights.WeightMap, "advise",
                        lambda self, names: (advised.extend(names), original(self, names)))
    memory = profile_model(folder, spec(sources), stream=False, **SETTINGS)
    hinted = profile_model(folder, spec(sources), **budgeted(budget))
    assert hinted.metadata["runtime"]["prefetch"] is False
    assert_same_profile(hinted, memory)
    engine = open_model(folder, device="cpu", stream=True)
    later = [n for n in engine.weights.targets if ".layers." in n and ".layers.0." not in n]
    assert sorted(set(advised)) == sorted(later)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_header_sizes_agree_with_the_engine(tiny_checkpoint, model_type):
    """The token budget's weights (`header_sizes`, headers only) are the engine's (`sizes`, the
    built model): the same total, resident bytes and layers, so `held_weights` is what a
    streamed CPU run holds."""
    from moekit.io.reader import Checkpoint
    from moekit.runtime.budget import header_sizes, held_weights

    folder = tiny_checkpoint(model_type)
    engine = open_model(folder, device="cpu", dtype="float32", stream=True)
    found = header_sizes(Checkpoint(folder), 4)
    assert (found.total, found.resident, found.layers) == (
        engine.sizes.total, engine.sizes.resident, engine.sizes.layers)
    largest = max(found.layers)
    assert held_weights(found, found.total) == found.total
    assert held_weights(found, found.total - 1) == found.resident + largest
