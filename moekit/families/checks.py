"""Config against tensors: what config.json says about the experts must match the weights, so
that no command (prune above all) rewrites a checkpoint whose config and tensors disagree."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError
from moekit.families.registry import first_key

if TYPE_CHECKING:
    from moekit.families.layout import ModelLayout, MoeLayer
    from moekit.io.reader import Checkpoint

FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
FIX = "config.json and the weights disagree: re-download the checkpoint or fix config.json"


def check_layout(layout: ModelLayout, checkpoint: Checkpoint) -> None:
    """Every MoE layer: router rows = config expert count, router width = hidden_size, all
    experts of a layer alike (same tensors, shapes, dtypes), and each unquantised expert
    projection [I, H] or [H, I] with I = the config's expert width."""
    config = layout.config
    for layer in layout.moe_layers:
        _check_router(layer, checkpoint, config, layout.family.keys.num_experts)
        _check_experts_alike(layer, checkpoint)
        width = _int_value(config, layout.family.keys.expert_width)
        hidden = _int_value(config, ("hidden_size",))
        if width and hidden and layer.expert_keys:
            for key in layer.expert_keys[0]:
                _check_projection(checkpoint, key, width, hidden, layout)


def _int_value(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    key = first_key(config, keys)
    value = config.get(key) if key else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_router(layer: MoeLayer, checkpoint: Checkpoint, config: dict[str, Any],
                  keys: tuple[str, ...]) -> None:
    router = checkpoint.tensors[layer.router_keys[0]] if layer.router_keys else None
    count = _int_value(config, keys)
    if count is not None and count != layer.num_experts:
        shape = list(router.shape) if router else "?"
        raise CheckpointError(
            f"config.json says {first_key(config, keys)}={count} but layer {layer.index} has "
            f"{layer.num_experts} experts ({router.name if router else 'router'} {shape})", FIX)
    hidden = _int_value(config, ("hidden_size",))
    if router is not None and router.dtype in FLOATS and hidden is not None and (
            len(router.shape) != 2 or router.shape[1] != hidden):
        raise CheckpointError(f"router '{router.name}' has shape {list(router.shape)}, expected "
                              f"[{layer.num_experts}, {hidden}] (hidden_size={hidden})", FIX)


def _check_experts_alike(layer: MoeLayer, checkpoint: Checkpoint) -> None:
    if not layer.expert_keys:
        return
    first = layer.expert_keys[0]
    for j, keys in enumerate(layer.expert_keys[1:], start=1):
        for key0, key in zip(first, keys, strict=True):
            a, b = checkpoint.tensors[key0], checkpoint.tensors[key]
            if (a.shape, a.dtype) != (b.shape, b.dtype):
                raise CheckpointError(
                    f"expert {j} of layer {layer.index} differs from expert 0: '{key}' is "
                    f"{b.dtype}{list(b.shape)} but '{key0}' is {a.dtype}{list(a.shape)}", FIX)


def _check_projection(checkpoint: Checkpoint, key: str, width: int, hidden: int,
                      layout: ModelLayout) -> None:
    info = checkpoint.tensors[key]
    roles = set(layout.family.experts.projections.values())
    name = key.rsplit(".", 2)
    if info.dtype not in FLOATS or len(info.shape) != 2 or len(name) < 3 or name[-1] != "weight" \
            or name[-2] not in roles:
        return
    if sorted(info.shape) != sorted((width, hidden)):
        keys = layout.family.keys.expert_width
        raise CheckpointError(
            f"expert tensor '{key}' has shape {list(info.shape)} but config.json says "
            f"{first_key(layout.config, keys)}={width} and hidden_size={hidden}", FIX)
