"""`moekit inspect`: what a checkpoint is, from its config and safetensors headers alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moekit.families.layout import ModelLayout, describe
from moekit.families.registry import first_value
from moekit.formats import Logical, check_quantization, logical_tensors, quantized_formats
from moekit.io.reader import Checkpoint


@dataclass
class InspectReport:
    """Facts about a checkpoint. Parameter counts are numel sums over the logical tensors (a
    quantized weight counts its values, not its packed bytes or scales: `moekit.formats`);
    `dtypes` gives them per stored format (`fp8-block`, `mxfp4`, or the plain dtype).
    active = total minus, in each MoE layer, the routed-expert parameters a token does not
    use (routed x (1 - k/E)), as Mistral, Qwen, OLMoE and Phi count (Qwen3-30B-A3B: 30.5 B /
    3.3 B). `active_params_no_embedding` also leaves out the input embedding rows a token does
    not read (all but one, when the LM head is a separate matrix), as OpenAI counts gpt-oss
    (20.9 B total, 3.6 B active). Multi-token-prediction layers
    (`ModelLayout.mtp_layers`) are counted apart in `mtp_params`, as the model cards do
    (DeepSeek-V3: 671 B + 14 B MTP)."""

    path: str
    family: str
    model_type: str
    architecture: str
    is_moe: bool
    num_layers: int
    moe_layers: list[int]
    experts_per_layer: list[int]
    top_k: int | None
    shared_experts: int
    expert_width: int | None
    expert_layout: str
    router_scoring: str
    dtypes: dict[str, int]
    quant_method: str | None
    bytes_on_disk: int
    num_shards: int
    total_params: int
    active_params: int
    routed_expert_params: int
    active_params_no_embedding: int = 0
    mtp_params: int = 0
    mtp_layers: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_checkpoint(folder: Path) -> InspectReport:
    """Build an InspectReport for a checkpoint folder without reading any weight."""
    checkpoint = Checkpoint(folder)
    layout = describe(checkpoint)
    logical = logical_tensors(checkpoint)
    numel = _logical_numel(logical)
    mtp = numel(layout.mtp_keys(list(checkpoint.tensors))) if layout.is_moe else 0
    total = sum(tensor.numel for tensor in logical.values()) - mtp
    routed, inactive = 0, 0.0
    for position, layer in enumerate(layout.moe_layers):
        layer_routed = numel(layer.routed_keys)
        routed += layer_routed
        inactive += layer_routed * (1 - layout.top_k(position) / layer.num_experts)
    config = layout.config
    base = dict(path=str(folder), family=layout.resolved.family.name,
                model_type=str(config.get("model_type", "")),
                architecture=", ".join(checkpoint.config.get("architectures") or []),
                num_layers=layout.num_layers, dtypes=quantized_formats(logical),
                quant_method=(check_quantization(checkpoint.config) or {}).get("quant_method"),
                bytes_on_disk=checkpoint.total_bytes, num_shards=len(checkpoint.shards),
                total_params=total,
                active_params=total - round(inactive),
                active_params_no_embedding=total - round(inactive)
                - _unread_embedding(checkpoint, logical),
                routed_expert_params=routed, mtp_params=mtp)
    if not layout.is_moe:
        return InspectReport(**base, is_moe=False, moe_layers=[], experts_per_layer=[],
                             top_k=None, shared_experts=0, expert_width=None, expert_layout="-",
                             router_scoring="-")
    return InspectReport(**base, is_moe=True, **_moe_facts(checkpoint, layout))


def _moe_facts(checkpoint: Checkpoint, layout: ModelLayout) -> dict[str, Any]:
    family, config = layout.family, layout.config
    shared = _first(first_value(config, family.keys.num_shared))
    if shared is None:
        shared = 1 if any(layer.shared_keys for layer in layout.moe_layers) else 0
    width = _first(first_value(config, family.keys.expert_width))
    return dict(
        moe_layers=[layer.index for layer in layout.moe_layers],
        mtp_layers=[layer.index for layer in layout.mtp_layers],
        experts_per_layer=[layer.num_experts for layer in layout.moe_layers],
        top_k=layout.top_k(), shared_experts=int(shared),
        expert_width=int(width) if isinstance(width, int) else None,
        expert_layout="fused" if any(layer.fused_keys for layer in layout.moe_layers)
        else "per-expert",
        router_scoring=_scoring(layout))


def _unread_embedding(checkpoint: Checkpoint, logical: dict[str, Logical]) -> int:
    """Parameters of the input embedding table a token does not read: all rows but one, when
    the checkpoint stores an untied LM head (`*lm_head.weight`); else 0."""
    import re

    tables = [t for n, t in logical.items()
              if re.fullmatch(r"(?:[\w.]+\.)?embed_tokens\.weight", n) and ".layers." not in n]
    heads = [n for n in logical if re.fullmatch(r"(?:[\w.]+\.)?lm_head\.weight", n)]
    if len(tables) != 1 or not heads or checkpoint.config.get("tie_word_embeddings") is True:
        return 0
    table = tables[0]
    return table.numel - (table.shape[-1] if len(table.shape) == 2 else 0)


def _logical_numel(logical: dict[str, Logical]) -> Callable[[Iterable[str]], int]:
    """numel(stored keys) -> parameters of the logical tensors they belong to, each once."""
    owner = {source.name: tensor for tensor in logical.values() for source in tensor.sources}

    def numel(keys: Iterable[str]) -> int:
        return sum(t.numel for t in {owner[k].name: owner[k] for k in keys}.values())

    return numel


def _first(value: Any) -> Any:
    """A per-layer config list (Hunyuan `num_shared_expert`, `moe_intermediate_size`): its first."""
    return (value[0] if value else None) if isinstance(value, list) else value


def _scoring(layout: ModelLayout) -> str:
    router, config = layout.family.router, layout.config
    text = router.describe()
    if router.grouped and config.get("topk_method") == "greedy":  # DeepSeek-V2 without groups
        text = text.replace("grouped top-k", "top-k")
    if router.renorm == "config":
        text = text.replace("renorm if config", "renorm" if config.get("norm_topk_prob")
                            else "no renorm")
    scale = first_value(config, layout.family.keys.scaling_factor)
    if router.scaled and scale is not None:
        text = text.replace("x scale", f"x {scale}")
    return text
