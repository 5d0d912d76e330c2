"""Map a family record onto a checkpoint's tensor names: which layers are MoE, which keys are
the router, each routed expert, the shared experts. Only headers are used.

Config against tensors (`check_layout`): what config.json says about the experts must match the
weights, so that no command (prune above all) rewrites a checkpoint whose config and tensors
disagree."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError
from moekit.families.registry import Resolved, first_key, first_value, resolve
from moekit.families.spec import MoeFamily

if TYPE_CHECKING:
    from moekit.io.reader import Checkpoint

FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
FIX = "config.json and the weights disagree: re-download the checkpoint or fix config.json"
MTP_ROOT = "mtp."  # Qwen3-Next's multi-token-prediction block (`mtp.layers.0.*`, `mtp.fc`, ...)


@dataclass(frozen=True)
class MoeLayer:
    """The tensors of one MoE layer.

    router_keys: sliced along axis 0 when experts are removed (router weight, router bias).
    selection_bias: sliced along its last axis (`e_score_correction_bias`, [E] or [1, E]).
    expert_keys[j]: expert j's tensors (per-expert layouts); empty for fused layouts.
    fused_keys: tensors stacking all experts on axis 0 (fused layouts; also a per-expert family
        found stored fused, e.g. `mlp.experts.gate_up_proj [E, 2I, H]`: check which is non-empty).
    """

    index: int
    prefix: str
    num_experts: int
    router_keys: tuple[str, ...]
    selection_bias: str | None
    expert_keys: tuple[tuple[str, ...], ...]
    fused_keys: tuple[str, ...]
    shared_keys: tuple[str, ...]

    @property
    def routed_keys(self) -> tuple[str, ...]:
        return tuple(k for keys in self.expert_keys for k in keys) + self.fused_keys

    @property
    def owned_keys(self) -> tuple[str, ...]:
        """Every key that moekit's surgery must handle for this layer (router + routed)."""
        bias = (self.selection_bias,) if self.selection_bias else ()
        return self.router_keys + bias + self.routed_keys


@dataclass(frozen=True)
class ModelLayout:
    """A checkpoint seen through its family record. `mtp_layers`: MoE layers stored past the
    decoder's `num_hidden_layers` (DeepSeek-V3's and GLM-4.5's multi-token-prediction block,
    `model.layers.{num_hidden_layers}.*`), which transformers does not run: no profile sees
    them, so surgery never chooses their experts (it drops them whole, `mtp_keys`). Qwen3-Next
    keeps its MTP block apart, under `mtp.` (`mtp.layers.0.*` with `mtp.fc`, norms)."""

    resolved: Resolved
    num_layers: int
    moe_layers: tuple[MoeLayer, ...]
    mtp_layers: tuple[MoeLayer, ...] = ()

    def mtp_keys(self, keys: list[str]) -> list[str]:
        """The `keys` that lie in an MTP block (the whole block, not only the experts: a
        `layers.N.` block, or everything under `mtp.` for Qwen3-Next's `mtp.layers.0`)."""
        prefixes = tuple(MTP_ROOT if layer.prefix.startswith(MTP_ROOT) else layer.prefix
                         for layer in self.mtp_layers)
        return [k for k in keys if prefixes and k.startswith(prefixes)]

    @property
    def family(self) -> MoeFamily:
        assert isinstance(self.resolved.family, MoeFamily)
        return self.resolved.family

    @property
    def config(self) -> dict[str, Any]:
        return self.resolved.config

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def top_k(self, position: int = 0) -> int:
        """Experts per token of the `position`-th MoE layer (some configs store a list)."""
        value = first_value(self.config, self.family.keys.top_k)
        if isinstance(value, list):
            value = value[min(position, len(value) - 1)]
        if value is None:
            raise CheckpointError(f"config has none of {self.family.keys.top_k} (top-k)")
        return int(value)


def describe(checkpoint: Checkpoint) -> ModelLayout:
    """Resolve the family of `checkpoint` and locate its MoE tensors (headers only)."""
    resolved = resolve(checkpoint.config)
    num_layers = int(first_value(resolved.config, ("num_hidden_layers", "n_layers",
                                                   "num_layers"), 0) or 0)
    if not isinstance(resolved.family, MoeFamily):
        return ModelLayout(resolved, num_layers, ())
    found = tuple(_moe_layers(checkpoint, resolved.family))
    mtp = tuple(layer for layer in found
                if 0 < num_layers <= layer.index or layer.prefix.startswith(MTP_ROOT))
    layers = tuple(layer for layer in found if layer not in mtp)
    if not layers:
        raise CheckpointError(
            f"config says {resolved.family.name} but no tensor matches its router "
            f"'*.layers.N.{resolved.family.router.weight}'",
            "the checkpoint layout is not the Hub one; is it quantised or renamed?")
    layout = ModelLayout(resolved, max(num_layers, layers[-1].index + 1), layers, mtp)
    check_layout(layout, checkpoint)
    return layout


def _moe_layers(checkpoint: Checkpoint, family: MoeFamily) -> list[MoeLayer]:
    router = re.escape(family.router.weight)
    pattern = re.compile(rf"^(?P<stack>(?:.*\.)?layers)\.(?P<i>\d+)\.{router}$")
    by_prefix: dict[str, list[str]] = {}
    for key in checkpoint.keys():
        match = re.match(r"^((?:.*\.)?layers\.\d+\.)", key)
        if match:
            by_prefix.setdefault(match.group(1), []).append(key)
    layers = []
    for key in checkpoint.keys():
        match = pattern.match(key)
        if match:
            prefix = f"{match['stack']}.{match['i']}."
            layers.append(_layer(checkpoint, family, int(match["i"]), prefix, by_prefix[prefix]))
    return sorted(layers, key=lambda layer: (layer.prefix.count("."), layer.index))


def _layer(checkpoint: Checkpoint, family: MoeFamily, index: int, prefix: str,
           keys: list[str]) -> MoeLayer:
    router = family.router
    num_experts = checkpoint.tensors[prefix + router.weight].shape[0]
    router_keys = tuple(prefix + k for k in (router.weight, router.bias) if k)
    router_keys = tuple(k for k in router_keys if k in checkpoint.tensors)
    selection = prefix + router.selection_bias if router.selection_bias else None
    if selection and selection not in checkpoint.tensors:
        selection = None
    layout = family.experts
    expert_keys: tuple[tuple[str, ...], ...] = ()
    fused: tuple[str, ...] = ()
    base = prefix + layout.prefixes[0].rstrip(".") + "."
    if layout.fused or _stacked(base, keys):
        # A per-expert family may also be stored fused in transformers' in-memory layout
        # (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`), as Qwen3.5-MoE is.
        starts = layout.prefixes if layout.fused else (layout.prefixes[0] + ".",)
        fused = tuple(k for k in keys if any(k.startswith(prefix + p) for p in starts))
        for key in fused:
            if checkpoint.tensors[key].shape[:1] != (num_experts,):
                raise CheckpointError(f"fused expert tensor '{key}' has shape "
                                      f"{list(checkpoint.tensors[key].shape)}, expected "
                                      f"{num_experts} experts on axis 0")
    else:
        expert_keys = _per_expert(checkpoint, base, keys, num_experts)
    shared = tuple(k for k in keys if any(k.startswith(prefix + p) for p in family.shared_prefixes))
    return MoeLayer(index, prefix, num_experts, router_keys, selection, expert_keys, fused, shared)


def _stacked(base: str, keys: list[str]) -> bool:
    """True when every key under `base` is a stacked tensor (`gate_up_proj`), none per-expert."""
    heads = {key[len(base):].split(".", 1)[0] for key in keys if key.startswith(base)}
    return bool(heads) and not any(head.isdigit() for head in heads)


def _per_expert(checkpoint: Checkpoint, base: str, keys: list[str],
                num_experts: int) -> tuple[tuple[str, ...], ...]:
    groups: dict[int, list[str]] = {}
    for key in keys:
        if key.startswith(base):
            head = key[len(base):].split(".", 1)[0]
            if not head.isdigit():
                raise CheckpointError(f"unexpected key '{key}' among the experts of '{base[:-1]}'")
            groups.setdefault(int(head), []).append(key)
    if sorted(groups) != list(range(num_experts)):
        raise CheckpointError(f"'{base[:-1]}' holds experts {sorted(groups)[:8]}... but its "
                              f"router has {num_experts} rows: ids must be 0..{num_experts - 1}")
    suffixes = {tuple(sorted(k[len(base) + len(str(j)):] for k in groups[j])) for j in groups}
    if len(suffixes) != 1:
        raise CheckpointError(f"experts of '{base[:-1]}' do not all have the same tensors")
    return tuple(tuple(sorted(groups[j])) for j in range(num_experts))


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
