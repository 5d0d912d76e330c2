"""Helpers for the prune tests: synthetic statistics in the profile contract, routing usage
recorded with hooks, and an in-memory reference pruning."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import torch

from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import describe
from moekit.io.reader import Checkpoint
from moekit.stats.expert_stats import write_stats


def write_synthetic_stats(stats_dir: Path, model_dir: Path, tokens: dict[int, list[float]],
                          domains: dict[str, float] | None = None,
                          fingerprint: str | None = None) -> Path:
    """Stats in the contract format. `tokens[layer][expert]` are the `all` counts; the other
    columns are derived deterministically (weight = 0.5 t, ean = 2 t + j, reap = t * (j+1)/10).
    `domains` maps extra domain names to a scale factor of the `all` values."""
    checkpoint = Checkpoint(model_dir)
    layout = describe(checkpoint)
    rows = []
    for domain, scale in {"all": 1.0, **(domains or {})}.items():
        for layer, counts in tokens.items():
            for j, t in enumerate(counts):
                t = t * scale
                rows.append(dict(layer=layer, expert=j, domain=domain, tokens=t,
                                 weight_sum=0.5 * t, ean_sum=2.0 * t + j,
                                 reap_sum=t * (j + 1) / 10, max_norm=float(j)))
    metadata = dict(model_fingerprint=fingerprint or model_fingerprint(checkpoint, layout),
                    moe_layers=[layer.index for layer in layout.moe_layers],
                    num_experts=layout.moe_layers[0].num_experts, top_k=layout.top_k(),
                    family=layout.family.name, domains=["all", *(domains or {})])
    return write_stats(stats_dir, rows, metadata)


def randomize_biases(source: Path, dest: Path, seed: int = 0) -> Path:
    """A copy of `source` whose selection biases (`e_score_correction_bias`, zero at init) hold
    small random values, so slicing them is visible in the logits."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(source, dest)
    generator = torch.Generator().manual_seed(seed)
    for path in dest.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k).clone() for k in handle.keys()}
            metadata = handle.metadata()
        for key, value in tensors.items():
            if key.endswith("e_score_correction_bias"):
                tensors[key] = torch.randn(value.shape, generator=generator) * 0.05
        save_file(tensors, str(path), metadata=metadata)
    return dest


def expert_usage(model: torch.nn.Module, family, input_ids: torch.Tensor) -> dict[int, Counter]:
    """How often each expert of each MoE decoder layer is chosen for `input_ids`. The experts'
    forward pre-hook gets `top_k_index`; Llama-4's experts are not decorated (they get the
    pre-scaled input only), so there the router's `scores` (0 off the top-k) are used."""
    from_experts: dict[int, Counter] = {}
    from_router: dict[int, Counter] = {}

    def pre(layer: int):  # noqa: ANN202
        def hook(_module, args):  # noqa: ANN001, ANN202
            if len(args) >= 2 and not torch.is_floating_point(args[1]):
                from_experts.setdefault(layer, Counter()).update(args[1].reshape(-1).tolist())
        return hook

    def post(layer: int):  # noqa: ANN202
        def hook(_module, _args, output):  # noqa: ANN001, ANN202
            scores = output[0] if isinstance(output, tuple) else output
            chosen = (scores.reshape(-1, scores.shape[-1]) > 0).nonzero()[:, 1]
            from_router.setdefault(layer, Counter()).update(chosen.tolist())
        return hook

    handles = []
    for name, module in model.named_modules():
        for suffix, kind in ((family.router.experts_module, pre), (family.router.module, post)):
            match = re.search(rf"layers\.(\d+)\.{re.escape(suffix)}$", name)
            if match:
                register = (module.register_forward_pre_hook if kind is pre
                            else module.register_forward_hook)
                handles.append(register(kind(int(match[1]))))
    with torch.no_grad():
        model(input_ids=input_ids)
    for handle in handles:
        handle.remove()
    return {layer: from_experts.get(layer, from_router[layer]) for layer in from_router}


def reference_pruned(original: torch.nn.Module, pruned_config, family, kept: dict[int, list[int]],
                     num_experts: int) -> torch.nn.Module:
    """The same pruning done independently in memory: in every MoE layer, each parameter or
    buffer of the router module, the experts module, or named `e_score_correction_bias` keeps
    the indices `kept` on its first axis of size E. Loaded strictly into a model built from the
    pruned config."""
    from transformers import AutoModelForCausalLM

    state = {}
    for key, value in original.state_dict().items():
        layer = _layer_of(key)
        owned = layer in kept and (
            f".{family.router.experts_module}." in key or f".{family.router.module}." in key
            or key.endswith("e_score_correction_bias"))
        if owned and num_experts in value.shape:
            axis = list(value.shape).index(num_experts)
            value = value.index_select(axis, torch.tensor(kept[layer]))
        state[key] = value
    model = AutoModelForCausalLM.from_config(pruned_config).eval()
    model.load_state_dict(state, strict=True)
    return model


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
