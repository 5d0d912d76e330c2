"""Staged reads (the accelerator path of `WeightMap.read`: tensors allocated on the device, bytes
through two small reused host buffers) give exactly what direct reads give. Run on the CPU here
with tiny buffers so every tensor crosses several chunks and both buffers alternate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit.runtime.engine import open_model
from moekit.runtime.staging import Staging


def _names(engine, layer: int) -> list[str]:
    return [n for n in engine.weights.targets if f".layers.{layer}." in n]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_staged_read_equals_direct_read(model_type, dtype, tiny_checkpoint):
    engine = open_model(tiny_checkpoint(model_type), device="cpu", dtype=dtype, stream=True)
    engine.weights.staging = Staging(chunk=1000)  # not a multiple of any tensor's size
    names = [n for n in engine.weights.targets]
    direct = engine.weights.read(names, "cpu", staged=False)
    staged = engine.weights.read(names, "cpu", staged=True)
    assert direct.keys() == staged.keys()
    for name, tensor in direct.items():
        assert staged[name].dtype == tensor.dtype
        assert torch.equal(staged[name], tensor), name


def test_staged_read_of_an_expert_group_equals_the_slice(tiny_checkpoint):
    engine = open_model(tiny_checkpoint("mixtral"), device="cpu", stream=True)
    engine.weights.staging = Staging(chunk=333)
    names = [n for n in _names(engine, 1) if ".experts." in n]
    whole = engine.weights.read(names, "cpu", staged=False)
    group = engine.weights.read(names, "cpu", rows=(1, 3), staged=True)
    for name in names:
        assert torch.equal(group[name], whole[name][1:3]), name


def test_streamed_logits_through_staging_equal_transformers(tiny_checkpoint, monkeypatch):
    from moekit.runtime import weights

    folder = tiny_checkpoint("qwen3_moe")
    original = weights.WeightMap.read

    def staged(self, names, device, rows=None, strip="", staged=None):
        return original(self, names, device, rows=rows, strip=strip, staged=True)

    monkeypatch.setattr(weights.WeightMap, "read", staged)
    torch.manual_seed(4)
    batches = [torch.randint(3, 256, (2, 20)) for _ in range(2)]
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    engine = open_model(folder, device="cpu", stream=True)
    engine.weights.staging = Staging(chunk=4096)
    for index, logits in engine.run(batches, head=True):
        with torch.no_grad():
            expected = reference(input_ids=batches[index]).logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_truncated_shard_is_a_checkpoint_error(tiny_checkpoint, tmp_path):
    import shutil

    from moekit.errors import CheckpointError

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("mixtral"), folder)
    engine = open_model(folder, device="cpu", stream=True)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])  # after the header was read and checked
    with pytest.raises(CheckpointError, match="short read"):
        engine.weights.read(_names(engine, 1), "cpu", staged=True)
