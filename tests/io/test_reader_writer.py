"""The checked reader, the streaming sharded writer and staged output folders."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moekit.errors import InvalidArgumentError, OutputExistsError
from moekit.io import bytecopy, writer
from moekit.io.dtypes import ITEM_SIZE, from_torch
from moekit.io.output import copy_aux_files, staged_output
from moekit.io.reader import INDEX_NAME, Checkpoint
from moekit.io.writer import OutTensor, write_checkpoint

SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def load_all(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a folder via safe_open, and the metadata of its (first) shard."""
    tensors, metadata = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = metadata or (handle.metadata() or {})
            for key in handle.keys():
                assert key not in tensors
                tensors[key] = handle.get_tensor(key)
    return tensors, metadata


def raw_bytes(checkpoint: Checkpoint, name: str) -> bytes:
    info = checkpoint.tensors[name]
    with open(info.shard, "rb") as handle:
        handle.seek(info.start)
        return handle.read(info.nbytes)


@pytest.fixture(scope="module")
def mixed_dtypes(tmp_path_factory) -> Path:
    """A one-shard checkpoint with odd shapes in every common dtype, and custom metadata."""
    folder = tmp_path_factory.mktemp("mixed")
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(7, 5, generator=gen),
        "b.bf16": torch.randn(3, 11, generator=gen).to(torch.bfloat16),
        "c.f16": torch.randn(13, generator=gen).to(torch.float16),
        "d.i64": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "e.u8": torch.arange(17, dtype=torch.uint8),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(3.5),
        "h.f8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
        "i.i32": torch.arange(-4, 4, dtype=torch.int32),
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", "who": "me"})
    (folder / "config.json").write_text(json.dumps({"model_type": "none"}))
    return folder


def test_reader_matches_safe_open(mixed_dtypes, tiny_checkpoint):
    for folder in (mixed_dtypes, tiny_checkpoint("gpt_oss")):
        checkpoint = Checkpoint(folder)
        expected, _ = load_all(folder)
        assert set(checkpoint.keys()) == set(expected)
        for name, tensor in expected.items():
            info = checkpoint.tensors[name]
            assert (info.dtype, info.shape) == (from_torch(tensor.dtype), tuple(tensor.shape))
            assert info.nbytes == tensor.numel() * ITEM_SIZE[info.dtype] == info.numel * (
                tensor.element_size())
            read = checkpoint.read(name)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor)
            assert raw_bytes(checkpoint, name) == tensor.reshape(-1).view(torch.uint8).numpy(
                ).tobytes()


def test_read_rows(tiny_checkpoint):
    checkpoint = Checkpoint(tiny_checkpoint("gpt_oss"))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    full = checkpoint.read(name)
    assert torch.equal(checkpoint.read_rows(name, [5, 0, 3]), full[[5, 0, 3]])
    assert torch.equal(checkpoint.read_rows(name, [2, 1], axis=1), full[:, [2, 1]])
    assert checkpoint.read_rows(name, []).shape == (0, *full.shape[1:])


@pytest.mark.parametrize("mode", ["copy", "computed"])
def test_round_trip_is_byte_identical(mode, mixed_dtypes, tiny_checkpoint, tmp_path):
    for n, folder in enumerate((mixed_dtypes, tiny_checkpoint("mixtral"))):
        source = Checkpoint(folder)
        if mode == "copy":
            planned = [OutTensor.copy(info) for info in source.tensors.values()]
        else:
            planned = [OutTensor.computed(info.name, info.dtype, info.shape,
                                          lambda name=info.name, c=source: c.read(name))
                       for info in source.tensors.values()]
        metadata = source.shards[0].metadata
        with staged_output(tmp_path / f"out{n}") as staging:
            paths = write_checkpoint(staging, planned, metadata=metadata)
            shutil.copyfile(folder / "config.json", staging / "config.json")
        assert [p.name for p in paths] == ["model.safetensors"]
        assert not (tmp_path / f"out{n}" / INDEX_NAME).exists()
        before, before_meta = load_all(folder)
        after, after_meta = load_all(tmp_path / f"out{n}")
        assert after_meta == before_meta
        assert set(after) == set(before)
        for name, tensor in before.items():
            assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor)
        written = Checkpoint(tmp_path / f"out{n}")
        header_end = min(info.start for info in written.tensors.values())
        for name, info in written.tensors.items():
            assert raw_bytes(written, name) == raw_bytes(source, name)
            assert (info.start - header_end) % ITEM_SIZE[info.dtype] == 0, "misaligned"


def test_sharded_output_loads_in_transformers(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint("mixtral")
    source = Checkpoint(folder)
    limit = 100_000
    out = tmp_path / "sharded"
    with staged_output(out, inputs=(folder,)) as staging:
        paths = write_checkpoint(staging, [OutTensor.copy(i) for i in source.tensors.values()],
                                 max_shard_bytes=limit)
        shutil.copyfile(folder / "config.json", staging / "config.json")
    count = len(paths)
    assert count > 3
    assert [p.name for p in sorted(out.glob("*.safetensors"))] == [
        f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in source.tensors.values())
    weight_map = {}
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            weight_map.update({key: path.name for key in handle.keys()})
            sizes = [source.tensors[k].nbytes for k in handle.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1
    assert index["weight_map"] == weight_map
    assert set(weight_map) == set(source.tensors)

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        resharded = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert torch.equal(original, resharded)


def test_writer_writes_in_chunks_of_at_most_1mib(tmp_path, monkeypatch):
    big = torch.arange(9 * (1 << 20) // 4 + 5, dtype=torch.float32)  # ~9 MiB, odd tail
    source = tmp_path / "source"
    source.mkdir()
    save_file({"big": big.clone()}, str(source / "model.safetensors"))
    (source / "config.json").write_text("{}")
    info = Checkpoint(source).tensors["big"]
    sizes: list[int] = []
    real_write = os.write

    def recording_write(fd: int, data) -> int:
        sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(writer.os, "write", recording_write)
    monkeypatch.setattr(bytecopy, "MODE", "loop")
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(out, [OutTensor.copy(info, name="copied"),
                           OutTensor.computed("made", "F32", tuple(big.shape), lambda: big * 2)])
    monkeypatch.undo()
    assert max(sizes) <= 1 << 20
    assert len(sizes) >= 2 * 3 + 1
    assert sum(sizes) == (out / "model.safetensors").stat().st_size
    tensors, _ = load_all(out)
    assert torch.equal(tensors["copied"], big) and torch.equal(tensors["made"], big * 2)


def test_writer_rejects_inconsistent_plans(tmp_path):
    ones = torch.ones(2, 3)
    with pytest.raises(ValueError, match="planned twice"):
        write_checkpoint(tmp_path, [OutTensor.computed("x", "F32", (2, 3), lambda: ones)] * 2)
    with pytest.raises(ValueError, match="planned as F32\\[2, 3\\] but produced F16"):
        write_checkpoint(tmp_path, [OutTensor.computed("x", "F32", (2, 3), ones.half)])
    with pytest.raises(ValueError, match="produced F32\\[3, 2\\]"):
        write_checkpoint(tmp_path, [OutTensor.computed("x", "F32", (2, 3), lambda: ones.T)])


# ---- staged_output -----------------------------------------------------------------------

def leftovers(parent: Path) -> list[str]:
    """Hidden moekit folders left in `parent`; a replaced output (`.moekit-old-PID`) is
    deleted by a background process, so wait for it (up to 30 s) before judging."""
    import time

    for _ in range(300):
        found = sorted(p.name for p in parent.iterdir() if ".moekit-" in p.name)
        if not any(".moekit-old-" in name for name in found):
            break
        time.sleep(0.1)
    return found


def test_staged_output_success_renames(tmp_path):
    out = tmp_path / "result"
    with staged_output(out) as staging:
        assert staging != out and staging.parent == out.parent and not out.exists()
        (staging / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert leftovers(tmp_path) == []


def test_staged_output_refuses_non_empty_output(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    with staged_output(out) as staging:  # an empty folder is fine
        (staging / "new.txt").write_text("new")
    with pytest.raises(OutputExistsError, match="not empty.*--overwrite"):
        with staged_output(out):
            pytest.fail("must not be entered")
    assert (out / "new.txt").read_text() == "new"
    with staged_output(out, overwrite=True) as staging:
        (staging / "newer.txt").write_text("newer")
    assert sorted(p.name for p in out.iterdir()) == ["newer.txt"]
    assert leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        with staged_output(tmp_path / "file", overwrite=True):
            pass


def test_staged_output_refuses_overlap_with_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out in (model, model / "pruned", tmp_path):
        with pytest.raises(InvalidArgumentError, match="overlaps the input"):
            with staged_output(out, overwrite=True, inputs=(model,)):
                pass
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]


def test_staged_output_exception_leaves_nothing(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(out) as staging:
            (staging / "half.safetensors").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(KeyboardInterrupt):
        with staged_output(out, overwrite=True) as staging:
            (staging / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_copy_aux_files(tiny_checkpoint, tmp_path):
    copied = copy_aux_files(tiny_checkpoint("qwen3_moe"), tmp_path)
    assert "tokenizer.json" in copied and "tokenizer_config.json" in copied
    assert "config.json" not in copied and "model.safetensors" not in copied
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(copied)
