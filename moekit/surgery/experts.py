"""One MoE layer's routed experts in a canonical float32 form, read from and written back to
the on-disk layout (per-expert tensors or fused stacks, transposed or not, gate/up
concatenated or interleaved, with or without biases).

Canonical shapes for E experts, hidden size H, intermediate size I:
gate, up [E, I, H]; down [E, H, I]; gate_bias, up_bias [E, I]; down_bias [E, H] (None when the
family has no expert biases). Expert j computes
    f_j(x) = down_j · act(gate_j x + b_g, up_j x + b_u) + b_d,
with act(g, u) = silu(g) * u (config `hidden_act`), or gpt-oss's clamped
(u + 1) * g * sigmoid(alpha * g) with g <= limit, |u| <= limit.

Quantized experts (`expert_format(..., checkpoint)`): the format names *logical* tensors
(`moekit.formats`: FP8 `...w1.weight` with its `weight_scale_inv`, MXFP4 `...gate_up_proj` for
its `_blocks`/`_scales`), `read_experts` decodes them, and `surgery/stored.py` writes changed
ones back in the stored format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moekit.errors import UnsupportedModelError
from moekit.formats import Logical, quantized_parts
from moekit.io.header import TensorInfo
from moekit.surgery.stored import (
    byte_piece,
    check_writable,
    plain,
    read_pieces,
    read_stored,
    read_values,
)

if TYPE_CHECKING:
    import torch

    from moekit.families.layout import ModelLayout, MoeLayer
    from moekit.io.reader import Checkpoint

__all__ = ["byte_piece", "read_pieces"]  # re-exported: their home is surgery/stored.py
ROLES = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


@dataclass
class Experts:
    """Stacked canonical expert weights (float32); biases may be None."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.gate.shape[0])

    def select(self, ids: list[int]) -> Experts:
        """The experts `ids`, in that order."""
        import torch

        index = torch.tensor(ids, dtype=torch.long)
        return Experts(*(None if t is None else t.index_select(0, index)
                         for t in (getattr(self, r) for r in ROLES)))

    def gram(self) -> torch.Tensor:
        """[E, E] float64: <theta_i, theta_j> of the experts' flattened parameters (all roles),
        summed role by role so no [E, P] copy is made."""
        total = None
        for t in (getattr(self, r) for r in ROLES):
            if t is not None:
                flat = t.reshape(t.shape[0], -1)
                part = (flat @ flat.T).double()
                total = part if total is None else total + part
        assert total is not None
        return total


def stack(experts: list[Experts]) -> Experts:
    """Concatenate experts along the expert axis."""
    import torch

    return Experts(*(None if getattr(experts[0], r) is None else torch.cat(
        [getattr(e, r) for e in experts]) for r in ROLES))


@dataclass(frozen=True)
class ExpertFormat:
    """How one layer stores its experts. Per-expert: `keys[role]` holds E keys per role.
    Fused: `gate_up`/`down` (and optional `*_bias`) stack all experts on axis 0."""

    fused: bool
    transposed: bool = False
    interleaved: bool = False
    per_expert: dict[str, tuple[str, ...]] | None = None
    gate_up: str | None = None
    down: str | None = None
    gate_up_bias: str | None = None
    down_bias: str | None = None
    logical: Mapping[str, Logical] = field(default_factory=dict, compare=False)
    parts: Mapping[str, str] = field(default_factory=dict, compare=False)

    def stored(self, name: str, info: TensorInfo) -> Logical:
        """The logical tensor `name` (quantized, or the plain stored tensor `info`)."""
        return self.logical.get(name) or plain(info)

    def logical_name(self, key: str) -> str:
        """The logical tensor a stored key belongs to (itself when plain)."""
        return self.parts.get(key, key)


def expert_format(layout: ModelLayout, layer: MoeLayer,
                  checkpoint: Checkpoint | None = None) -> ExpertFormat:
    """Recognise the layer's expert tensors; UnsupportedModelError for anything else
    (unknown per-expert tensors; quantized ones unless `checkpoint` is given to decode them)."""
    if checkpoint is None:
        return _plain_format(layout, layer)
    parts = quantized_parts(checkpoint, layer.routed_keys)
    if not parts:
        return _plain_format(layout, layer)
    names = {k: logical.name for k, logical in parts.items()}

    def renamed(keys: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(names.get(k, k) for k in keys))

    logical_layer = dataclasses.replace(
        layer, expert_keys=tuple(renamed(keys) for keys in layer.expert_keys),
        fused_keys=renamed(layer.fused_keys))
    fmt = _plain_format(layout, logical_layer)
    return dataclasses.replace(fmt, logical={v.name: v for v in parts.values()}, parts=names)


def writable_format(layout: ModelLayout, layer: MoeLayer, checkpoint: Checkpoint) -> ExpertFormat:
    """`expert_format` of a layer whose experts will be changed and written back: refuses
    stored formats moekit cannot re-encode (`surgery.stored.check_writable`)."""
    fmt = expert_format(layout, layer, checkpoint)
    for key, name in fmt.parts.items():
        logical = fmt.logical[name]
        if key != name and key not in {s.name for s in logical.sources}:
            raise UnsupportedModelError(
                f"expert tensor '{key}' is an activation parameter of the quantized "
                f"'{logical.name}', which moekit cannot recompute for changed experts",
                "convert the checkpoint with `moekit convert --dtype bf16` first (or, for "
                "merge, pass --bf16-experts)")
        check_writable(logical)
    return fmt


def _plain_format(layout: ModelLayout, layer: MoeLayer) -> ExpertFormat:
    spec = layout.family.experts
    if layer.expert_keys:
        base = layer.prefix + spec.prefixes[0].rstrip(".") + "."
        keys: dict[str, list[str]] = {"gate": [], "up": [], "down": []}
        for j, owned in enumerate(layer.expert_keys):
            wanted = {role: f"{base}{j}.{spec.projections[role]}.weight" for role in keys}
            extra = sorted(set(owned) - set(wanted.values()))
            if extra or any(k not in owned for k in wanted.values()):
                raise _unsupported(layout, extra[0] if extra else sorted(wanted.values())[0])
            for role, key in wanted.items():
                keys[role].append(key)
        return ExpertFormat(False, per_expert={r: tuple(v) for r, v in keys.items()})
    return _fused_format(layout, layer)


def _fused_format(layout: ModelLayout, layer: MoeLayer) -> ExpertFormat:
    spec = layout.family.experts
    if spec.fused:
        gate_up = layer.prefix + spec.projections["gate_up"]
        down = layer.prefix + spec.projections["down"]
        transposed, interleaved = spec.transposed, spec.interleaved
    else:  # a per-expert family stored in transformers' fused in-memory layout
        base = layer.prefix + spec.prefixes[0] + "."
        gate_up, down, transposed, interleaved = base + "gate_up_proj", base + "down_proj", False, \
            False
    names = {gate_up, down}
    biases = {k: k + "_bias" if k + "_bias" in layer.fused_keys else None for k in names}
    extra = sorted(set(layer.fused_keys) - names - {b for b in biases.values() if b})
    if extra or not names <= set(layer.fused_keys):
        raise _unsupported(layout, extra[0] if extra else gate_up)
    return ExpertFormat(True, transposed, interleaved, gate_up=gate_up, down=down,
                        gate_up_bias=biases[gate_up], down_bias=biases[down])


def _unsupported(layout: ModelLayout, key: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"cannot merge the experts of this {layout.family.name} checkpoint: tensor '{key}' is "
        "not a plain gate/up/down projection (quantised or unknown layout)",
        "merge the unquantised (bf16/fp16/fp32) checkpoint, or use `moekit prune`")


def read_float(info: TensorInfo, rows: list[int] | None = None) -> torch.Tensor:
    """`info` (or its rows `rows` on axis 0) as float32, read with plain file reads: no memory
    map, so nothing of the file stays mapped (and counted in RSS) after the call."""
    return read_stored(info, rows).float()


def _values(checkpoint: Checkpoint, fmt: ExpertFormat, name: str,
            rows: list[int] | None = None) -> torch.Tensor:
    """float32 values of logical tensor `name` (rows on axis 0), decoded when quantized."""
    logical = fmt.logical.get(name)
    if logical is None:
        return read_float(checkpoint.tensors[name], rows)
    return read_values(logical, rows)


def read_experts(checkpoint: Checkpoint, fmt: ExpertFormat,
                 ids: list[int] | None = None) -> Experts:
    """Experts `ids` (all when None) of one layer, float32, canonical shapes."""
    import torch

    if not fmt.fused:
        assert fmt.per_expert is not None
        chosen = ids if ids is not None else list(range(len(fmt.per_expert["gate"])))
        stack = {r: torch.stack([_values(checkpoint, fmt, fmt.per_expert[r][j])
                                 for j in chosen]) for r in ("gate", "up", "down")}
        return Experts(stack["gate"], stack["up"], stack["down"])

    def rows(key: str) -> torch.Tensor:
        return _values(checkpoint, fmt, key, ids)

    gate_up = rows(fmt.gate_up)  # type: ignore[arg-type]
    down = rows(fmt.down)  # type: ignore[arg-type]
    if fmt.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate, up = split_halves(gate_up, fmt.interleaved)
    experts = Experts(gate.contiguous(), up.contiguous(), down.contiguous())
    if fmt.gate_up_bias:
        experts.gate_bias, experts.up_bias = split_halves(rows(fmt.gate_up_bias), fmt.interleaved)
    if fmt.down_bias:
        experts.down_bias = rows(fmt.down_bias)
    return experts


def split_halves(value: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, 2I, ...] -> gate, up [E, I, ...] (alternating rows when interleaved)."""
    if interleaved:
        return value[:, 0::2], value[:, 1::2]
    first, second = value.chunk(2, dim=1)
    return first, second


def join_halves(first: torch.Tensor, second: torch.Tensor, interleaved: bool) -> torch.Tensor:
    import torch

    if interleaved:
        return torch.stack([first, second], dim=2).flatten(1, 2)
    return torch.cat([first, second], dim=1)


def fused_tensors(fmt: ExpertFormat, experts: Experts) -> dict[str, torch.Tensor]:
    """The fused on-disk tensors (float32) holding `experts`, keyed by their names."""
    gate_up = join_halves(experts.gate, experts.up, fmt.interleaved)
    down = experts.down
    if fmt.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    out = {fmt.gate_up: gate_up.contiguous(), fmt.down: down.contiguous()}
    if fmt.gate_up_bias:
        out[fmt.gate_up_bias] = join_halves(experts.gate_bias, experts.up_bias, fmt.interleaved)
    if fmt.down_bias:
        out[fmt.down_bias] = experts.down_bias
    return out  # type: ignore[return-value]


def activation(layout: ModelLayout) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """act(gate_pre [.., I], up_pre [.., I]) -> [.., I] for the layout's family."""
    import torch

    config: dict[str, Any] = layout.config
    if layout.family.name == "gpt_oss":
        alpha, limit = float(config.get("swiglu_alpha", 1.702)), float(
            config.get("swiglu_limit", 7.0))

        def glu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
            return (u + 1) * (g * torch.sigmoid(g * alpha))
        return glu
    from transformers.activations import ACT2FN

    act = ACT2FN[config.get("hidden_act") or config.get("hidden_activation") or "silu"]
    return lambda g, u: act(g) * u


def hidden(experts: Experts, j: int, x: torch.Tensor,
           act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """h_j(x) [N, I] = act(gate_j x + b_g, up_j x + b_u) for inputs x [N, H]."""
    g, u = x @ experts.gate[j].T, x @ experts.up[j].T
    if experts.gate_bias is not None:
        g, u = g + experts.gate_bias[j], u + experts.up_bias[j]  # type: ignore[index]
    return act(g, u)


def expert_output(experts: Experts, j: int, x: torch.Tensor,
                  act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """f_j(x) [N, H] for inputs x [N, H] (float32)."""
    y = hidden(experts, j, x, act) @ experts.down[j].T
    return y + experts.down_bias[j] if experts.down_bias is not None else y
