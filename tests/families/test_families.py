"""Family records checked against transformers itself: config keys, module paths, router
semantics (run the real router and recompute its top-k weights from the record), and the
on-disk keys that layout discovery assigns to each MoE layer."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from tiny_models import DENSE_TYPES, MOE_TYPES, build_model, read_config

from moekit.errors import UnsupportedModelError
from moekit.families.layout import describe
from moekit.families.registry import ALL_FAMILIES, MOE_FAMILIES, by_name, first_value, resolve
from moekit.families.spec import DenseFamily, MoeFamily
from moekit.io.reader import Checkpoint

EXPECTED_FAMILY = {
    "qwen3_5_moe_text": "qwen3_5_moe", "llama4_text": "llama4", "gemma3_text": "gemma3",
}
# Grouped routers are rebuilt with one group so that plain top-k is the reference selection.
ONE_GROUP = {"n_group": 1, "topk_group": 1}


@functools.cache
def _model(model_type: str, **overrides):
    return build_model(model_type, **overrides)


def _moe_layer_modules(model) -> dict[int, str]:
    """Decoder-layer index -> name of its `experts` module, found by walking the modules."""
    found = {}
    for name, _ in model.named_modules():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.experts", name)
        if match:
            found[int(match[1])] = match[2]
    return found


@pytest.mark.parametrize("model_type", MOE_TYPES + DENSE_TYPES)
def test_every_tiny_config_resolves(model_type, tiny_checkpoint):
    config = read_config(tiny_checkpoint(model_type))
    resolved = resolve(config)
    assert resolved.family.name == EXPECTED_FAMILY.get(model_type, model_type)
    assert resolved.is_moe == (model_type in MOE_TYPES)
    assert by_name(model_type) is resolved.family


def test_registry_names_are_unique():
    names = [f.name for f in ALL_FAMILIES]
    model_types = [t for f in ALL_FAMILIES for t in f.model_types]
    assert len(set(names)) == len(names)
    assert len(set(model_types)) == len(model_types)


def test_kimi_k2_and_architecture_fallback():
    assert resolve({"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]}
                   ).family.name == "deepseek_v3"
    # Unknown model_type: the architectures list decides.
    resolved = resolve({"model_type": "my_mixtral", "architectures": ["MixtralForCausalLM"]})
    assert resolved.family.name == "mixtral"


@pytest.mark.parametrize(("top", "text", "family"), [
    ("llama4", "llama4_text", "llama4"),
    ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_moe"),
    ("gemma3", "gemma3_text", "gemma3"),
])
def test_nested_text_config_is_the_one_read(top, text, family):
    config = {"model_type": top, "architectures": ["X"], "vision_config": {"hidden_size": 8},
              "text_config": {"model_type": text, "num_experts_per_tok": 3,
                              "num_hidden_layers": 7}}
    resolved = resolve(config)
    assert resolved.family.name == family
    assert resolved.config_path == ("text_config",)
    assert resolved.config["num_hidden_layers"] == 7


def test_unsupported_config_names_every_family():
    with pytest.raises(UnsupportedModelError) as err:
        resolve({"model_type": "bert", "architectures": ["BertModel"]})
    message = str(err.value)
    assert "bert" in message and "BertModel" in message and "\n" not in message
    for family in ALL_FAMILIES:
        assert family.name in message
    with pytest.raises(UnsupportedModelError, match="unknown family 'nope'"):
        by_name("nope")


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_config_keys_and_module_paths_match_transformers(model_type, tiny_checkpoint):
    family = by_name(model_type)
    assert isinstance(family, MoeFamily)
    config = read_config(tiny_checkpoint(model_type))
    model = _model(model_type)
    layers = _moe_layer_modules(model)
    assert layers, "the tiny model has no MoE layer"
    layer = model.model.layers[min(layers)]
    router = layer.get_submodule(family.router.module)
    experts = layer.get_submodule(family.router.experts_module)
    assert family.router.experts_module.endswith(layers[min(layers)] + ".experts")
    num_experts, top_k = experts.gate_up_proj.shape[0], router.top_k
    width = experts.down_proj.shape[1 if family.experts.transposed else 2]
    hidden = model.config.hidden_size
    expected_gate_up = (num_experts, hidden, 2 * width) if family.experts.transposed else (
        num_experts, 2 * width, hidden)
    assert tuple(experts.gate_up_proj.shape) == expected_gate_up
    assert first_value(config, family.keys.num_experts) == num_experts
    assert first_value(config, family.keys.top_k) == top_k
    assert first_value(config, family.keys.expert_width) == width
    shared = _shared_modules(layer)
    if family.keys.num_shared and first_value(config, family.keys.num_shared) is not None:
        n_shared = first_value(config, family.keys.num_shared)
        assert shared["down"].in_features == width * n_shared
    if family.keys.shared_width and first_value(config, family.keys.shared_width) is not None:
        assert shared["down"].in_features == first_value(config, family.keys.shared_width)


def _shared_modules(layer) -> dict:
    for name, module in layer.named_modules():
        if re.fullmatch(r"[^.]+\.(shared_expert|shared_experts|shared_mlp)", name):
            return {"down": module.down_proj}
    return {}


def _selection_bias(block):
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        if name.endswith("e_score_correction_bias"):
            return tensor
    return None


def _route(family: MoeFamily, layer, hidden):
    """Run the model's own router: (logits [T,E], chosen ids [T,k], their weights [T,k]).
    The logits must sit at the record's `logits_index` and equal hidden @ W.T (+ bias)."""
    router = layer.get_submodule(family.router.module)
    block = layer.get_submodule(family.router.module.rsplit(".", 1)[0])
    if family.name == "minimax_m2":  # the selection bias lives on the block, passed in
        out = router(hidden, block.e_score_correction_bias)
    else:
        out = router(hidden)
    params = dict(router.named_parameters())
    weight = next(p for n, p in params.items() if n.endswith("weight") and "e_score" not in n)
    expected = hidden @ weight.T + (params["bias"] if "bias" in params else 0)
    torch.testing.assert_close(out[family.router.logits_index].float(), expected)
    if family.name == "llama4":  # (dense scores [T,E] with zeros off the top-k, logits)
        scores, logits = out
        idx = scores.topk(router.top_k, dim=-1).indices
        return logits, scores.gather(-1, idx), idx
    return out


def _reference(family: MoeFamily, config: dict, logits, bias, k: int):
    """Top-k ids and weights as the family record describes them."""
    spec, logits = family.router, logits.float()
    if spec.topk_first:
        top, idx = logits.topk(k, dim=-1)
        weights = top.softmax(-1) if spec.scoring == "softmax" else top.sigmoid()
    else:
        scores = logits.softmax(-1) if spec.scoring == "softmax" else logits.sigmoid()
        choice = scores + bias.reshape(-1) if spec.selection_bias else scores
        idx = choice.topk(k, dim=-1).indices
        weights = scores.gather(-1, idx)
    if spec.renorm == "always" or (spec.renorm == "config" and config.get("norm_topk_prob")):
        weights = weights / weights.sum(-1, keepdim=True)
    if spec.scaled:
        weights = weights * first_value(config, family.keys.scaling_factor, 1.0)
    return idx, weights.to(torch.float32)


def _sorted(idx, weights):
    order = idx.argsort(dim=-1)
    return idx.gather(-1, order), weights.float().gather(-1, order)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_router_semantics_match_the_record(model_type):
    """The record's scoring / top-k order / selection bias / renorm / scaling reproduce the
    weights transformers' router computes, on random logits and a random selection bias."""
    family = by_name(model_type)
    overrides = ONE_GROUP if family.router.grouped else {}
    model = _model(model_type, **overrides)
    config = model.config.to_dict()
    layer = model.model.layers[min(_moe_layer_modules(model))]
    router = layer.get_submodule(family.router.module)
    block = layer.get_submodule(family.router.module.rsplit(".", 1)[0])
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, model.config.hidden_size, generator=generator)
    with torch.no_grad():
        for _, param in router.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
        bias = _selection_bias(block)
        assert (bias is not None) == bool(family.router.selection_bias)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.3)
        logits, weights, idx = _route(family, layer, hidden)
        ref_idx, ref_weights = _reference(family, config, logits, bias, idx.shape[-1])
    idx, weights = _sorted(idx, weights)
    ref_idx, ref_weights = _sorted(ref_idx, ref_weights)
    assert torch.equal(idx, ref_idx)
    if family.name == "phimoe":  # sparsemixer weights are masked softmaxes: ids only
        assert "sparsemixer" in family.router.note
        return
    torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=1e-5)
    if bias is not None:  # the bias really changed some choices, so the check had teeth
        plain = _reference(family, config, logits, bias * 0, idx.shape[-1])[0]
        assert not torch.equal(_sorted(plain, plain.float())[0], ref_idx)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_layout_accounts_for_every_block_tensor(model_type, tiny_checkpoint):
    """Every on-disk tensor of an MoE block is the router, the selection bias, a routed expert
    or a shared expert, and each group has the size of the matching in-memory modules."""
    family = by_name(model_type)
    checkpoint = Checkpoint(tiny_checkpoint(model_type))
    layout = describe(checkpoint)
    model = _model(model_type)
    memory_layers = _moe_layer_modules(model)
    assert [layer.index for layer in layout.moe_layers] == sorted(memory_layers)
    block = family.router.weight.split(".")[0] + "."
    numel = {name: info.numel for name, info in checkpoint.tensors.items()}
    for layer in layout.moe_layers:
        on_disk = {k for k in checkpoint.keys() if k.startswith(layer.prefix + block)}
        assert on_disk == set(layer.owned_keys) | set(layer.shared_keys)
        assert (layer.selection_bias is not None) == bool(family.router.selection_bias)
        module = model.model.layers[layer.index]
        experts = module.get_submodule(family.router.experts_module)
        assert sum(numel[k] for k in layer.routed_keys) == sum(
            p.numel() for p in experts.parameters())
        router = module.get_submodule(family.router.module)
        assert sum(numel[k] for k in layer.router_keys) == sum(
            p.numel() for n, p in router.named_parameters() if "e_score" not in n)
        shared = sum(p.numel() for n, p in module.named_parameters()
                     if re.match(r"[^.]+\.shared_(expert|experts|mlp|expert_gate)\.", n))
        assert sum(numel[k] for k in layer.shared_keys) == shared
        if family.experts.fused:
            assert layer.fused_keys and not layer.expert_keys
        else:
            assert len(layer.expert_keys) == layer.num_experts and not layer.fused_keys


@pytest.mark.parametrize("family", MOE_FAMILIES, ids=lambda f: f.name)
def test_router_description_is_one_line(family):
    text = family.router.describe()
    assert family.router.scoring in text and "\n" not in text


def test_dense_records_name_an_mlp():
    for family in ALL_FAMILIES:
        if isinstance(family, DenseFamily):
            assert set(family.mlp) == {"gate", "up", "down"}


@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f.router.grouped],
                         ids=lambda f: f.name)
def test_grouped_routers_keep_to_topk_group_groups(family):
    """With n_group=2, topk_group=1 every token's experts come from a single group of E/2."""
    model_type = family.model_types[0]
    model = _model(model_type, n_group=2, topk_group=1)
    layer = model.model.layers[min(_moe_layer_modules(model))]
    router = layer.get_submodule(family.router.module)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
        _, _, idx = _route(family, layer, torch.randn(256, model.config.hidden_size,
                                                      generator=generator))
    groups = idx // (router.weight.shape[0] // 2)
    assert (groups == groups[:, :1]).all()
    assert groups.unique().numel() == 2  # both groups are used across tokens
