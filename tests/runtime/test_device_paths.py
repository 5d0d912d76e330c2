"""Where engine-device tensors meet CPU-held ones (replay caches, CPU routing, selection biases
read from the checkpoint): every module call gets its arguments on the module's device.

On a CPU-only machine the second device is `meta`: an experts stand-in whose parameters live
there asserts that every tensor it is called with is on `meta` too, as a CUDA module's kernels
require (`histogram_cpu not implemented for 'Int'` was the symptom on CUDA), and returns CPU
zeros so that the host-side arithmetic after the call runs. With CUDA present, the calibrated
prune and the merge calibration also run end to end on it and are compared with the CPU run.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moekit.calib.routing import Routing, route
from moekit.layerfit.compensate import expert_hidden
from moekit.layerfit.replay import expert_outputs
from moekit.layerfit.router_fit import exact_error

CUDA = torch.cuda.is_available()
OTHER = "meta"  # the stand-in for the engine's device


class DeviceCheckingExperts(torch.nn.Module):
    """A transformers-like experts module (`experts(hidden [N, H], ids [N, k], weights [N, k])`)
    whose parameters are on `device`; records each call's argument devices."""

    def __init__(self, num: int, hidden: int, inner: int, device: str = OTHER):
        super().__init__()
        self.down_proj = torch.nn.Parameter(torch.zeros(num, hidden, inner, device=device),
                                            requires_grad=False)
        self.num_experts, self.hidden = num, hidden
        self.has_bias = self.is_transposed = self.has_post_expert_norm = False
        self.calls: list[set[str]] = []

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        devices = {str(t.device) for t in (hidden, ids, weights)}
        self.calls.append(devices)
        assert devices == {str(self.down_proj.device)}, \
            f"experts on {self.down_proj.device} called with tensors on {sorted(devices)}"
        return torch.zeros(hidden.shape[0], self.hidden)


ROUTING = Routing("softmax", False, 2, True)


def test_route_takes_the_bias_to_the_logits_device():
    """CPU logits with an engine-device bias, or the reverse (merge calibration: CUDA logits,
    the checkpoint's CPU bias): the routing is computed where the logits are."""
    gen = torch.Generator().manual_seed(0)
    z, bias = torch.randn(6, 8, generator=gen), torch.randn(8, generator=gen)
    keep = [0, 1, 2, 4, 5, 7]
    sigmoid = Routing("sigmoid", False, 2, True)
    ids, weights = route(z, sigmoid, bias, keep)
    moved_ids, moved_weights = route(z.to(OTHER), sigmoid, bias, keep)
    assert moved_ids.device.type == OTHER and moved_weights.device.type == OTHER
    assert moved_ids.shape == ids.shape and moved_weights.shape == weights.shape
    # the CPU result against an independent computation: top-2 of sigmoid(z) + b among keep
    scores = z[:, keep].sigmoid()
    want = torch.tensor(keep)[torch.topk(scores + bias[keep], 2, dim=-1)[1]]
    assert torch.equal(ids, want)


def test_expert_outputs_runs_the_module_on_its_device():
    experts = DeviceCheckingExperts(num=8, hidden=4, inner=16)
    inputs, cand = torch.randn(5, 4), torch.randint(0, 8, (5, 3))  # CPU, as the replay holds
    out = expert_outputs(experts, inputs, cand)
    assert out.shape == (5, 3, 4) and out.device.type == "cpu"
    assert experts.calls == [{OTHER}]


def test_expert_hidden_runs_the_module_on_its_device():
    """Refit activations h_e(x): CPU routing ids (the replay's) and rows from anywhere."""
    experts = DeviceCheckingExperts(num=8, hidden=4, inner=10)
    saved = experts.down_proj
    out = expert_hidden(experts, torch.randn(6, 4), torch.randint(0, 8, (6, 1)))
    assert out.shape == (6, 10) and out.device.type == "cpu"
    assert len(experts.calls) == math.ceil(10 / 4) and experts.down_proj is saved


def test_exact_error_runs_the_module_on_its_device():
    """Router refit scoring: routing recomputed on the CPU, the experts on the engine device."""
    experts = DeviceCheckingExperts(num=8, hidden=4, inner=16)
    replay = SimpleNamespace(routing_for=lambda keep: ROUTING, bias=None)
    inputs, logits = torch.randn(5, 4), torch.randn(5, 8)
    target = torch.randn(5, 4)
    err = exact_error(replay, experts, inputs, logits, target, [0, 1, 2, 3, 4, 5])
    assert err == pytest.approx(float(target.pow(2).sum(-1).mean()))  # the stand-in returns 0
    assert experts.calls == [{OTHER}]


# --- CUDA present: the same pipelines on the GPU against the CPU ----------------------------

def _choose(folder, device: str, width: int | None):
    from tiny_models import _docstring_corpus

    from moekit.calib.data import DataSource
    from moekit.calib.spec import DataSpec
    from moekit.families.fingerprint import model_fingerprint
    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint
    from moekit.ops.prune.calibrated import DataOptions, choose_with_data
    from moekit.runtime.options import RunOptions

    text = folder.parent / "text.txt"
    text.write_text("\n".join(_docstring_corpus()[:1200]))
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    options = DataOptions(DataSpec((DataSource("doc", text),), seq_len=64), max_tokens=1024,
                          beam=2, router=True, protect_super=False, width=width,
                          run=RunOptions(device=device, dtype="float32"))
    return choose_with_data(folder, layout, model_fingerprint(checkpoint, layout),
                            criterion="measured", ratio=0.25, protect={}, min_experts=None,
                            options=options, log=lambda _: None)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("model_type", "width"), [("mixtral", None), ("deepseek_v3", None),
                                                   ("qwen2_moe", 16), ("gpt_oss", None)])
def test_calibrated_prune_on_cuda_matches_cpu(model_type, width, tmp_path):
    """Measured selection, down-projection and router refits (and trimming) on CUDA: the same
    candidates as on the CPU, the same held-out KL where the same experts were kept."""
    from tiny_models import save_tiny

    folder = save_tiny(model_type, tmp_path / "src")
    on_cpu, on_gpu = _choose(folder, "cpu", width), _choose(folder, "cuda", width)
    assert [c.name for c in on_gpu.candidates] == [c.name for c in on_cpu.candidates]
    for cpu, gpu in zip(on_cpu.candidates, on_gpu.candidates, strict=True):
        assert math.isfinite(gpu.kl)
        if [p.kept for p in cpu.plan.layers] == [p.kept for p in gpu.plan.layers]:
            assert gpu.kl == pytest.approx(cpu.kl, rel=5e-2, abs=1e-5), cpu.name


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_moe"])
def test_merge_calibration_on_cuda_matches_cpu(model_type, tmp_path):
    """Captured inputs and the family's routing (selection bias read from the checkpoint)."""
    from tiny_models import _docstring_corpus, save_tiny

    from moekit.calib.data import DataSource
    from moekit.families.layout import describe
    from moekit.io.reader import Checkpoint
    from moekit.ops.merge.calib import capture_calibration

    folder = save_tiny(model_type, tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(_docstring_corpus()[:400]))
    layout = describe(Checkpoint(folder))
    runs = [capture_calibration(folder, layout, [DataSource("t", text)], max_tokens=256,
                                seq_len=64, device=device) for device in ("cpu", "cuda")]
    for layer in runs[0].layers:
        cpu, gpu = runs[0][layer], runs[1][layer]
        assert gpu.inputs.device.type == "cpu"
        torch.testing.assert_close(gpu.inputs, cpu.inputs, rtol=1e-4, atol=1e-4)
        assert float((gpu.ids == cpu.ids).float().mean()) > 0.98
