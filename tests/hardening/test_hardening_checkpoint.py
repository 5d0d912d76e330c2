"""Issue #11, defect 6: corrupt or inconsistent checkpoints are refused, in one line, before
any output exists, for every command (the reader validates whole headers; the layout checks
the config against the tensors). Defect 8 (index shard names outside the folder) too."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from support import sharded_copy
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.io.reader import INDEX_NAME

RUNNER = CliRunner()
W1 = "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight"


def raw_shard(path: Path) -> tuple[dict, bytes]:
    """The header (as a dict) and the data bytes of a safetensors file."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def write_raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_shard(folder: Path, change: Callable[[dict, bytes], bytes]) -> None:
    path = folder / "model.safetensors"
    header, data = raw_shard(path)
    write_raw(path, header, change(header, data))


def remove_range(header: dict, data: bytes, start: int, end: int) -> bytes:
    """Cut data[start:end] out and shift every later offset back."""
    for name, entry in header.items():
        if name != "__metadata__" and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [o - (end - start) for o in entry["data_offsets"]]
    return data[:start] + data[end:]


def overlapping(header: dict, data: bytes) -> bytes:
    a, b = W1.format(l=0, e=6), W1.format(l=0, e=7)
    start, end = header[b]["data_offsets"]
    data = remove_range({k: v for k, v in header.items() if k != b}, data, start, end)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b's bytes are a's bytes
    return data


def trailing(header: dict, data: bytes) -> bytes:
    return data + b"\0" * 64


def negative(header: dict, data: bytes) -> bytes:
    entry = header[W1.format(l=1, e=0)]
    entry["data_offsets"] = [-8, entry["data_offsets"][1] - entry["data_offsets"][0] - 8]
    return data


def unknown_dtype(header: dict, data: bytes) -> bytes:
    header[W1.format(l=0, e=3)]["dtype"] = "BF17"
    return data


def one_expert_reshaped(header: dict, data: bytes) -> bytes:
    entry = header[W1.format(l=1, e=3)]
    rows, cols = entry["shape"]
    entry["shape"] = [rows // 2, cols * 2]
    return data


def every_expert_reshaped(header: dict, data: bytes) -> bytes:
    for name, entry in header.items():
        if ".w1." in name:
            entry["shape"] = [entry["shape"][0] // 2, entry["shape"][1] * 2]
    return data


SHARD_CASES = {
    overlapping: ["overlap"], trailing: ["64 bytes after the last tensor"],
    negative: ["data_offsets must be two non-negative integers"],
    unknown_dtype: ["unknown dtype 'BF17'"],
    one_expert_reshaped: ["expert 3 of layer 1 differs from expert 0"],
    every_expert_reshaped: ["has shape [16, 128]", "intermediate_size=32"],
}


def _drop_list(tmp_path: Path) -> Path:
    path = tmp_path / "drop.txt"
    path.write_text("0: 0 1\n1: 0 1\n")
    return path


def assert_refused(result, needles: list[str], out: Path) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("change", list(SHARD_CASES), ids=lambda f: f.__name__)
def test_prune_refuses_corrupt_shards(change, tiny_checkpoint, tmp_path):
    bad = shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "bad")
    edit_shard(bad, change)
    out = tmp_path / "out"
    result = RUNNER.invoke(app, ["prune", str(bad), "--drop", str(_drop_list(tmp_path)),
                                 "--out", str(out)])
    assert_refused(result, SHARD_CASES[change], out)
    assert_refused(RUNNER.invoke(app, ["inspect", str(bad)]), SHARD_CASES[change], out)


def test_config_expert_count_must_match_the_weights(tiny_checkpoint, tmp_path):
    """The issue's 16-expert model with num_local_experts: 8 (here 8 experts, config says 4)."""
    bad = shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["num_local_experts"] = 4
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = RUNNER.invoke(app, ["prune", str(bad), "--drop", str(_drop_list(tmp_path)),
                                 "--out", str(out)])
    assert_refused(result, ["num_local_experts=4", "8 experts"], out)


def test_router_width_must_match_hidden_size(tiny_checkpoint, tmp_path):
    bad = shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["hidden_size"] = 48
    (bad / "config.json").write_text(json.dumps(config))
    result = RUNNER.invoke(app, ["inspect", str(bad)])
    assert_refused(result, ["block_sparse_moe.gate.weight", "hidden_size=48"], tmp_path / "out")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors",
                                   "..", "config.json"])
def test_index_shard_names_outside_the_folder_are_refused(shard, tiny_checkpoint, tmp_path):
    """Defect 8: refused before anything is opened, and no byte of the named file is shown."""
    src = sharded_copy(tiny_checkpoint("mixtral"), tmp_path / "bad")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"SECRET-BYTES" * 10)
    index = json.loads((src / INDEX_NAME).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (src / INDEX_NAME).write_text(json.dumps(index))
    result = RUNNER.invoke(app, ["inspect", str(src)])
    assert_refused(result, ["not a .safetensors file in the checkpoint folder"], tmp_path / "o")
    assert "SECRET" not in result.output and "root:" not in result.output
