"""Issue #11: property-based fuzzing of safetensors headers and index files. Every case ends in
a one-line moekit error or a correct result (what safetensors itself reads), never another
exception, never an output folder."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moekit.cli.app import app
from moekit.errors import MoekitError
from moekit.io.dtypes import ITEM_SIZE
from moekit.io.reader import INDEX_NAME, Checkpoint

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
DTYPES = [*ITEM_SIZE, "BF17", "", "f32"]
NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=8)
COUNT = st.one_of(st.integers(0, 6), st.integers(-3, 2**65), st.booleans(), st.floats(0, 4),
                  st.text(max_size=2), st.none())


@st.composite
def shards(draw) -> bytes:
    """A safetensors file: valid tensors laid out back to back, then optionally mangled."""
    entries, data, offset = {}, b"", 0
    for name in draw(st.lists(NAMES, max_size=5, unique=True)):
        dtype = draw(st.sampled_from(list(ITEM_SIZE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = ITEM_SIZE[dtype]
        for dim in shape:
            size *= dim
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        data += bytes(draw(st.integers(0, 255)) for _ in range(min(size, 4))) + b"\0" * (
            size - min(size, 4))
        offset += size
    header: object = entries
    if entries and draw(st.booleans()):
        name = draw(st.sampled_from(sorted(entries)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "entry"]))
        if field == "dtype":
            entries[name]["dtype"] = draw(st.sampled_from(DTYPES))
        elif field == "shape":
            entries[name]["shape"] = draw(st.one_of(st.lists(COUNT, max_size=3), COUNT))
        elif field == "data_offsets":
            entries[name]["data_offsets"] = draw(st.one_of(st.lists(COUNT, max_size=3), COUNT))
        elif field == "drop":
            del entries[name]
        else:
            entries[name] = draw(st.one_of(COUNT, st.lists(COUNT, max_size=2)))
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(
            st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
            st.dictionaries(st.text(max_size=3), COUNT, max_size=2), COUNT))
    if draw(st.integers(0, 9)) == 0:
        header = draw(st.one_of(COUNT, st.lists(COUNT, max_size=2)))
    raw = json.dumps(header).encode()
    raw = raw if draw(st.integers(0, 9)) else draw(st.binary(max_size=40))
    raw += b" " * draw(st.integers(0, 7))
    length = len(raw) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**64 - 1))
    tail = draw(st.sampled_from(["keep", "cut", "extend"]))
    if tail == "cut" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif tail == "extend":
        data += draw(st.binary(min_size=1, max_size=9))
    return struct.pack("<Q", length) + raw + data


def _safetensors_view(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]] | None:
    """What the safetensors library reads from `path` (None when it refuses the file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = list(handle.keys())
            return {k: (handle.get_slice(k).get_dtype(), tuple(handle.get_slice(k).get_shape()),
                        None) for k in keys}
    except Exception:  # noqa: BLE001 - any refusal counts
        return None


def _one_line(err: MoekitError) -> None:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text


@FUZZ
@given(blob=shards())
def test_fuzzed_shard_is_refused_in_one_line_or_read_correctly(blob):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text("{}")
        path = folder / "model.safetensors"
        path.write_bytes(blob)
        try:
            checkpoint = Checkpoint(folder)
        except MoekitError as err:
            _one_line(err)
            return
        expected = _safetensors_view(path)
        assert expected is not None, "moekit accepted a file safetensors refuses"
        got = {k: (i.dtype, i.shape) for k, i in checkpoint.tensors.items()}
        assert got == {k: (_dtype_name(d), s) for k, (d, s, _) in expected.items()}
        for info in checkpoint.tensors.values():
            with open(path, "rb") as handle:
                handle.seek(info.start)
                assert len(handle.read(info.nbytes)) == info.nbytes


def _dtype_name(name: str) -> str:
    """safetensors' Python dtype names to the file format's."""
    table = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
             "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64",
             "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
             "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0"}
    return table.get(name, name)


SHARD_NAMES = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "missing.safetensors", "../model-00001-of-00002.safetensors", "/etc/passwd",
               "config.json", "", "..", "sub/model.safetensors", "model.safetensors\0x"]


@st.composite
def indexes(draw, keys: list[str]) -> str:
    """An index file: the true weight map, then some keys moved, added or removed, or junk."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.text(max_size=30), st.just("[]"), st.just('{"weight_map": 3}')))
    truth = {k: SHARD_NAMES[i % 2] for i, k in enumerate(keys)}
    weight_map: dict[str, object] = dict(truth)
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["move", "add", "remove", "junk"]))
        key = draw(st.sampled_from(keys))
        if action == "move":
            weight_map[key] = draw(st.sampled_from(SHARD_NAMES))
        elif action == "add":
            weight_map[draw(NAMES)] = draw(st.sampled_from(SHARD_NAMES))
        elif action == "remove":
            weight_map.pop(key, None)
        else:
            weight_map[key] = draw(COUNT)
    return json.dumps({"metadata": {}, "weight_map": weight_map})


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, tiny_checkpoint) -> Path:
    from moekit.io.writer import OutTensor, write_checkpoint

    src = Checkpoint(tiny_checkpoint("mixtral"))
    folder = tmp_path_factory.mktemp("two")
    paths = write_checkpoint(folder, [OutTensor.copy(i) for i in src.tensors.values()],
                             max_shard_bytes=src.total_bytes // 2)
    assert [p.name for p in paths] == SHARD_NAMES[:2]
    shutil.copyfile(src.folder / "config.json", folder / "config.json")
    return folder


def test_index_fuzz(two_shards, tmp_path):
    keys = sorted(Checkpoint(two_shards).tensors)
    truth = {k: v for k, v in json.loads((two_shards / INDEX_NAME).read_text())[
        "weight_map"].items()}

    @FUZZ
    @given(text=indexes(keys))
    def check(text):
        (folder / INDEX_NAME).write_text(text)
        try:
            checkpoint = Checkpoint(folder)
        except MoekitError as err:
            _one_line(err)
            assert "SECRET" not in str(err)
            return
        assert {k: i.shard.name for k, i in checkpoint.tensors.items()} == truth
        assert json.loads(text)["weight_map"] == truth

    folder = shutil.copytree(two_shards, tmp_path / "fuzz")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"SECRET" * 20)
    check()


def test_prune_on_fuzzed_headers_leaves_no_output(tiny_checkpoint, tmp_path):
    """The real tiny Mixtral with a mangled header: `prune` ends in one line (exit 2) or a
    complete, readable output; never a traceback, never a partial folder."""
    source = tiny_checkpoint("mixtral")
    original = (source / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", original[:8])
    header = json.loads(original[8:8 + length])
    names = sorted(k for k in header if k != "__metadata__")
    drop = tmp_path / "drop.txt"
    drop.write_text("0: 0\n1: 0\n")

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(name=st.sampled_from(names), field=st.sampled_from(["dtype", "shape", "data_offsets"]),
           value=st.one_of(COUNT, st.lists(COUNT, max_size=3), st.sampled_from(DTYPES)),
           extra=st.integers(0, 3))
    def check(name, field, value, extra):
        case = shutil.copytree(source, tmp_path / "case", dirs_exist_ok=True)
        mangled = json.loads(json.dumps(header))
        mangled[name][field] = value
        raw = json.dumps(mangled).encode()
        (case / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw +
                                                 original[8 + length:] + b"\0" * extra)
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        result = CliRunner().invoke(app, ["prune", str(case), "--drop", str(drop), "--out",
                                          str(out)])
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
        assert not leftovers, leftovers
        if result.exit_code == 0:
            assert Checkpoint(out).tensors  # complete and readable
            return
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert not out.exists()

    check()
