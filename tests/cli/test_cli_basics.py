"""The CLI shell: fast `--help` without heavy imports, and bad input turned into one line and a
non-zero exit code (no traceback)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support import sharded_copy
from typer.testing import CliRunner

from moekit import __version__
from moekit.cli.app import app
from moekit.errors import MoekitError
from moekit.families.registry import ALL_FAMILIES
from moekit.io.reader import INDEX_NAME, Checkpoint
from moekit.io.writer import OutTensor, write_checkpoint

HEAVY = ("torch", "transformers", "pandas", "matplotlib")


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert "inspect" in names
    for name in names:
        assert name in result.stdout
    sub = CliRunner().invoke(app, ["inspect", "--help"])
    assert sub.exit_code == 0 and "Example" in sub.stdout and "--json" in sub.stdout


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"moekit {__version__}"


def test_cli_import_and_help_stay_light():
    """`moekit --help` must not pay for torch/transformers/pandas/matplotlib imports."""
    code = (
        "import json, sys\n"
        "import moekit.cli.app as cli\n"
        f"after_import = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "sys.argv = ['moekit', '--help']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        f"after_help = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(json.dumps([after_import, after_help]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    after_import, after_help = json.loads(run.stdout.strip().splitlines()[-1])
    assert after_import == [] and after_help == []
    assert "inspect" in run.stdout


# ---- bad input: one line, non-zero exit, no traceback ---------------------------------------

def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def no_config(src: Path, dst: Path) -> tuple[Path, list[str]]:
    copy_of(src, dst)
    (dst / "config.json").unlink()
    return dst, ["no config.json"]


def unsupported(src: Path, dst: Path) -> tuple[Path, list[str]]:
    copy_of(src, dst)
    edit_json(dst / "config.json", lambda c: c.update(model_type="bert",
                                                       architectures=["BertForMaskedLM"]))
    return dst, ["unsupported architecture", "bert", "BertForMaskedLM",
                 *[f.name for f in ALL_FAMILIES]]


def missing_shard(src: Path, dst: Path) -> tuple[Path, list[str]]:
    sharded_copy(src, dst)
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    victim.unlink()
    return dst, [victim.name, "missing"]


def truncated(src: Path, dst: Path) -> tuple[Path, list[str]]:
    copy_of(src, dst)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return dst, ["model.safetensors", "truncated"]


def truncated_to_nothing(src: Path, dst: Path) -> tuple[Path, list[str]]:
    copy_of(src, dst)
    (dst / "model.safetensors").write_bytes(b"\x10\x00")
    return dst, ["model.safetensors", "truncated"]


def listed_but_absent(src: Path, dst: Path) -> tuple[Path, list[str]]:
    sharded_copy(src, dst)
    name = "model.layers.0.block_sparse_moe.experts.99.w1.weight"
    edit_json(dst / INDEX_NAME, lambda i: i["weight_map"].update(
        {name: f"model-00001-of-{len(list(dst.glob('model-*'))):05d}.safetensors"}))
    return dst, [name, "absent from", "model-00001-of-"]


def corrupt_header(src: Path, dst: Path) -> tuple[Path, list[str]]:
    copy_of(src, dst)
    path = dst / "model.safetensors"
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8:8 + length] = b"\xff{not json" + b" " * (length - 10)
    path.write_bytes(bytes(data))
    return dst, ["model.safetensors", "corrupt", "header"]


def huge_header_length(src: Path, dst: Path) -> tuple[Path, list[str]]:
    copy_of(src, dst)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    return dst, ["header length", "exceeds the file"]


def duplicate_across_shards(src: Path, dst: Path) -> tuple[Path, list[str]]:
    from safetensors.torch import save_file

    copy_of(src, dst)
    name = "model.embed_tokens.weight"
    save_file({name: Checkpoint(src).read(name).clone()}, str(dst / "extra.safetensors"))
    return dst, [name, "extra.safetensors", "model.safetensors", "both"]


def duplicate_with_index(src: Path, dst: Path) -> tuple[Path, list[str]]:
    from safetensors.torch import save_file

    sharded_copy(src, dst)
    name = "lm_head.weight"
    shards = sorted(dst.glob("model-*.safetensors"))
    owner = json.loads((dst / INDEX_NAME).read_text())["weight_map"][name]
    other = next(p for p in shards if p.name != owner)
    sharded = Checkpoint(dst)
    tensors = {k: sharded.read(k).clone() for k, info in sharded.tensors.items()
               if info.shard == other}
    tensors[name] = Checkpoint(src).read(name).clone()
    save_file(tensors, str(other))
    return dst, [name, "both", owner, other.name]


def index_disagrees(src: Path, dst: Path) -> tuple[Path, list[str]]:
    sharded_copy(src, dst)
    name = "model.norm.weight"
    index = json.loads((dst / INDEX_NAME).read_text())
    wrong = next(v for v in index["weight_map"].values() if v != index["weight_map"][name])
    edit_json(dst / INDEX_NAME, lambda i: i["weight_map"].update({name: wrong}))
    return dst, [name, wrong, "disagree"]


def bad_index_json(src: Path, dst: Path) -> tuple[Path, list[str]]:
    sharded_copy(src, dst)
    (dst / INDEX_NAME).write_text("{ not json")
    return dst, [INDEX_NAME, "not a valid index"]


def index_without_map(src: Path, dst: Path) -> tuple[Path, list[str]]:
    sharded_copy(src, dst)
    edit_json(dst / INDEX_NAME, lambda i: i.update(weight_map=["model.norm.weight"]))
    return dst, [INDEX_NAME, "weight_map"]


def no_safetensors(src: Path, dst: Path) -> tuple[Path, list[str]]:
    copy_of(src, dst)
    (dst / "model.safetensors").unlink()
    return dst, ["no *.safetensors"]


def gap_in_expert_ids(src: Path, dst: Path) -> tuple[Path, list[str]]:
    dst.mkdir()
    source = Checkpoint(src)
    renamed = [OutTensor.copy(info, info.name.replace(".experts.7.", ".experts.9."))
               for info in source.tensors.values()]
    write_checkpoint(dst, renamed)
    shutil.copyfile(src / "config.json", dst / "config.json")
    return dst, ["experts", "router has 8 rows", "ids must be 0..7"]


def missing_folder(src: Path, dst: Path) -> tuple[Path, list[str]]:
    return dst / "nowhere", ["does not exist"]


CASES = [no_config, unsupported, missing_shard, truncated, truncated_to_nothing,
         listed_but_absent, corrupt_header, huge_header_length, duplicate_across_shards,
         duplicate_with_index, index_disagrees, bad_index_json, index_without_map,
         no_safetensors, gap_in_expert_ids, missing_folder]


def assert_one_line_error(result, expected: list[str]) -> None:
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in expected:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.mark.parametrize("make", CASES, ids=lambda f: f.__name__)
def test_bad_input_gives_one_line(make, tiny_checkpoint, tmp_path):
    folder, expected = make(tiny_checkpoint("mixtral"), tmp_path / "bad")
    assert_one_line_error(CliRunner().invoke(app, ["inspect", str(folder)]), expected)
    assert_one_line_error(CliRunner().invoke(app, ["inspect", str(folder), "--json"]), expected)


def test_moe_config_without_router_tensors(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint("llama"), tmp_path / "fake")
    mixtral = json.loads((tiny_checkpoint("mixtral") / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(mixtral))
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert_one_line_error(result, ["mixtral", "block_sparse_moe.gate.weight"])


def test_debug_flag_shows_the_exception(tiny_checkpoint, tmp_path):
    folder, _ = no_config(tiny_checkpoint("mixtral"), tmp_path / "bad")
    result = CliRunner().invoke(app, ["--debug", "inspect", str(folder)])
    assert result.exit_code != 0 and isinstance(result.exception, MoekitError)
    # The flag does not stick to the next command.
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert isinstance(result.exception, SystemExit)


def test_export_with_unknown_suffix_is_one_line(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tiny_checkpoint("mixtral")), "--export",
                                      str(tmp_path / "facts.xlsx")])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ".xlsx" in lines[0] and ".csv" in lines[0]


def test_error_text_with_rich_markup_is_printed_verbatim():
    """A message holding `[/...]` (gloo errors do) must not break the one-line error."""
    code = ("from moekit.cli.common import handle_errors\n"
            "from moekit.errors import MoekitError\n"
            "@handle_errors\n"
            "def boom():\n"
            "    raise MoekitError('[/pytorch/gloo/pair.cc:553] Connection closed [bold]x')\n"
            "boom()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "[/pytorch/gloo/pair.cc:553] Connection closed [bold]x" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_reader_that_leaves_early_gets_no_error(tiny_checkpoint):
    """`moekit inspect M --json | head -1`: the pipe closes before moekit writes; no error
    line, no 'Exception ignored' at exit, the exit status of a process killed by SIGPIPE."""
    import os

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    run = subprocess.run([sys.executable, "-m", "moekit", "inspect",
                          str(tiny_checkpoint("mixtral")), "--json"], stdout=write,
                         stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert run.returncode == 141 and run.stderr == "", run.stderr
