"""Map a family record onto a checkpoint's tensor names: which layers are MoE, which keys are
the router, each routed expert, the shared experts. Only headers are used."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moekit.errors import CheckpointError
from moekit.families.checks import check_layout
from moekit.families.registry import Resolved, first_value, resolve
from moekit.families.spec import MoeFamily

if TYPE_CHECKING:
    from moekit.io.reader import Checkpoint


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
    them, so surgery never chooses their experts (it drops them whole, `mtp_keys`)."""

    resolved: Resolved
    num_layers: int
    moe_layers: tuple[MoeLayer, ...]
    mtp_layers: tuple[MoeLayer, ...] = ()

    def mtp_keys(self, keys: list[str]) -> list[str]:
        """The `keys` that lie in an MTP layer (its whole block, not only the experts)."""
        prefixes = tuple(layer.prefix for layer in self.mtp_layers)
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
    mtp = tuple(layer for layer in found if 0 < num_layers <= layer.index)
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
