"""moekit.runtime: streamed runs (layer by layer, weights read from disk) give what the
in-memory model gives, for every family: profile counts and sums, eval loss, layer inputs."""

from __future__ import annotations

import pytest
import torch
from support import SETTINGS, assert_same_profile, sources, spec  # noqa: F401
from tiny_models import DENSE_TYPES, MOE_TYPES
from transformers import AutoModelForCausalLM

from moekit.ops.evaluate import evaluate
from moekit.ops.profile import profile_model
from moekit.runtime.engine import open_model


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_streamed_profile_equals_in_memory(model_type, tiny_checkpoint, sources):  # noqa: F811
    folder = tiny_checkpoint(model_type)
    memory = profile_model(folder, spec(sources), stream=False, **SETTINGS)
    streamed = profile_model(folder, spec(sources), stream=True, **SETTINGS)
    assert memory.metadata["runtime"]["mode"] == "memory"
    assert streamed.metadata["runtime"]["mode"] == "stream"
    assert int(memory.expert_stats["tokens"].sum()) > 0
    assert_same_profile(streamed, memory)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_streamed_eval_loss_equals_in_memory(model_type, tiny_checkpoint, sources):  # noqa: F811
    folder = tiny_checkpoint(model_type)
    memory = evaluate(folder, spec(sources), stream=False, **SETTINGS)
    streamed = evaluate(folder, spec(sources), stream=True, hidden_ram=0, **SETTINGS)
    assert streamed.settings["runtime"]["model"]["hidden_states"].startswith("spilled")
    assert streamed.overall.tokens == memory.overall.tokens
    assert streamed.overall.loss == pytest.approx(memory.overall.loss, abs=1e-4)
    for a, b in zip(streamed.domains, memory.domains, strict=True):
        assert a.loss == pytest.approx(b.loss, abs=1e-4)


def test_streamed_kl_against_a_streamed_reference(tiny_checkpoint, sources):  # noqa: F811
    model, ref = tiny_checkpoint("mixtral"), tiny_checkpoint("mixtral", seed=5)
    memory = evaluate(model, spec(sources), ref, stream=False, **SETTINGS)
    streamed = evaluate(model, spec(sources), ref, stream=True, keep_both=False, **SETTINGS)
    assert streamed.settings["runtime"]["ref"]["mode"] == "stream"
    assert streamed.overall.kl > 0
    assert streamed.overall.kl == pytest.approx(memory.overall.kl, rel=1e-4)
    assert streamed.overall.top1 == memory.overall.top1


@pytest.mark.parametrize("model_type", ["gpt_oss", "qwen3_next", "llama4_text", "deepseek_v3"])
@pytest.mark.parametrize("stream", [False, True])
def test_layer_inputs_match_the_models_hidden_states(model_type, stream, tiny_checkpoint):
    """`on_layer` sees each layer's input: transformers' output_hidden_states[i]."""
    folder = tiny_checkpoint(model_type)
    torch.manual_seed(1)
    batches = [torch.randint(3, 256, (2, 20)) for _ in range(2)]
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = [reference(input_ids=b, output_hidden_states=True).hidden_states
                    for b in batches]
    seen: dict[int, list[torch.Tensor]] = {}
    engine = open_model(folder, device="cpu", stream=stream)

    def on_layer(step) -> None:
        assert not any(p.is_meta for p in step.module.parameters())
        seen[step.index] = [step.inputs(b).clone() for b in range(len(batches))]

    list(engine.run(batches, on_layer=on_layer))
    assert sorted(seen) == list(range(len(expected[0]) - 1))
    for layer, inputs in seen.items():
        for b, hidden in enumerate(inputs):
            torch.testing.assert_close(hidden, expected[b][layer], rtol=1e-5, atol=1e-5)


def test_each_layer_is_read_once_and_freed(tiny_checkpoint, monkeypatch):
    from moekit.runtime import weights

    folder = tiny_checkpoint("qwen3_moe")
    engine = open_model(folder, device="cpu", stream=True)
    reads: list[str] = []
    original = weights.WeightMap.read

    def counting(self, names, *args, **kwargs):
        reads.extend(names)
        return original(self, names, *args, **kwargs)

    monkeypatch.setattr(weights.WeightMap, "read", counting)
    batches = [torch.randint(3, 256, (2, 16)) for _ in range(4)]
    list(engine.run(batches))
    assert len(reads) == len(set(reads))
    layer_keys = [n for n in engine.weights.targets if ".layers." in n]
    assert sorted(reads) == sorted(layer_keys)
    assert all(p.is_meta for p in engine.model.model.layers.parameters())


@pytest.mark.parametrize("model_type", DENSE_TYPES)
def test_streamed_dense_logits_equal_in_memory(model_type, tiny_checkpoint):
    """Dense models (upcycling sources) stream too: same logits as transformers' own."""
    folder = tiny_checkpoint(model_type)
    torch.manual_seed(2)
    batches = [torch.randint(3, 256, (2, 20)) for _ in range(2)]
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    engine = open_model(folder, device="cpu", stream=True, hidden_ram=0)
    for index, logits in engine.run(batches, head=True):
        with torch.no_grad():
            expected = reference(input_ids=batches[index]).logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_upcycle_calibration_streamed_equals_in_memory(tiny_checkpoint, sources):  # noqa: F811
    from moekit.calib.spec import DataSpec
    from moekit.ops.upcycle.calib import capture_ffn_inputs
    from moekit.runtime.options import RunOptions

    folder, cpu = tiny_checkpoint("llama"), RunOptions(device="cpu")
    data = DataSpec(tuple(sources), seq_len=24, max_tokens=100)
    memory = capture_ffn_inputs(folder, data, run=cpu, stream=False)
    streamed = capture_ffn_inputs(folder, data, run=cpu, stream=True)
    assert memory.tokens == streamed.tokens > 0
    for layer, inputs in memory.inputs.items():
        torch.testing.assert_close(streamed.inputs[layer], inputs, rtol=1e-5, atol=1e-5)


def test_mtp_layers_on_disk_are_left_out_as_the_model_does(tiny_checkpoint, sources, tmp_path):  # noqa: F811
    """DeepSeek-V3 keeps its MTP block as `model.layers.{num_hidden_layers}.*`: transformers
    ignores it, and so does streaming."""
    from support import with_mtp_layer

    folder = with_mtp_layer(tiny_checkpoint("deepseek_v3"), tmp_path / "with-mtp")
    engine = open_model(folder, device="cpu", stream=True)
    assert len(engine.model.model.layers) == 3
    assert any(k.startswith("model.layers.3.") for k in engine.weights.unused)
    memory = evaluate(folder, spec(sources), stream=False, **SETTINGS)
    streamed = evaluate(folder, spec(sources), stream=True, **SETTINGS)
    assert streamed.overall.loss == pytest.approx(memory.overall.loss, abs=1e-4)


@pytest.mark.parametrize("prefetch", [True, False])
def test_prefetched_and_hinted_layers_give_the_same_logits(prefetch, tiny_checkpoint):
    """Both ways of reading ahead (a second layer in memory, used on CUDA; page-cache hints,
    used on CPU) feed each layer its own weights: logits equal transformers' own."""
    from dataclasses import replace

    folder = tiny_checkpoint("qwen2_moe")
    torch.manual_seed(3)
    batches = [torch.randint(3, 256, (2, 20)) for _ in range(2)]
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    engine = open_model(folder, device="cpu", stream=True)
    engine.plan = replace(engine.plan, prefetch=prefetch)
    for index, logits in engine.run(batches, head=True):
        with torch.no_grad():
            expected = reference(input_ids=batches[index]).logits
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
