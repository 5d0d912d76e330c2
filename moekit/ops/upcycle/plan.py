"""Validate an upcycling job before any weight is read: the dense model, the target family,
the expert shapes, the scales that keep the layer function, and the target config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.calib.spec import DataSpec
from moekit.errors import CheckpointError, InvalidArgumentError, UnsupportedModelError
from moekit.families.registry import MOE_FAMILIES, resolve
from moekit.families.spec import DenseFamily, MoeFamily
from moekit.io.reader import Checkpoint
from moekit.io.writer import DEFAULT_SHARD_BYTES
from moekit.ops.upcycle.config import TARGETS, MoeShape, build_config, resolve_target
from moekit.ops.upcycle.experts import ROLES
from moekit.runtime.options import RunOptions

METHODS = ("copy", "split", "drop")
ROUTERS = ("random", "zero", "data")
SPLIT_ORDERS = ("contiguous", "random", "cluster")


UPCYCLE_TOKENS = 2048  # the default --max-tokens of --router data / --split-order cluster

@dataclass(frozen=True)
class UpcycleOptions:
    """What the user asked for (CLI flags one to one)."""

    experts: int
    top_k: int
    method: str = "copy"
    arch: str | None = None
    router: str = "random"
    router_std: float = 0.02
    seed: int = 0
    split_order: str = "contiguous"
    drop_ratio: float = 0.5
    shared_expert: bool = False
    shared_neurons: int | None = None
    norm_topk_prob: bool = True
    aux_loss_coef: float = 0.001
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    # calibration text of --router data / --split-order cluster (max_tokens None:
    # UPCYCLE_TOKENS), and how its one forward pass runs (dtype auto: float32 on a CPU,
    # else the checkpoint's)
    data: DataSpec = DataSpec()
    run: RunOptions = RunOptions()


@dataclass
class UpcyclePlan:
    """A validated job. `ffn_keys[layer][role]` names the dense FFN tensors; `prefixes[layer]`
    is the layer prefix (`model.layers.3.`)."""

    checkpoint: Checkpoint
    dense: DenseFamily
    family: MoeFamily
    options: UpcycleOptions
    ffn_keys: dict[int, dict[str, str]]
    prefixes: dict[int, str]
    hidden: int
    width: int
    dtype: str
    expert_width: int
    shared_width: int | None
    renorm: bool
    routed_scale: float
    shared_scale: float
    shape: MoeShape | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def preservation(self) -> str:
        """When the upcycled model computes exactly what the dense one does at init."""
        opts = self.options
        if opts.method == "drop" and opts.drop_ratio > 0:
            return "no: drop re-initialises neurons on purpose (train before use)"
        if opts.method == "split":
            if opts.router == "zero" and opts.top_k == opts.experts:
                return "exact (zero router, top-k = experts)"
            return "approximate: exact only with --router zero and --top-k = --experts"
        if self.renorm:
            return "exact (renormalised top-k weights sum to 1 over identical experts)"
        if opts.router == "zero":
            return "exact (zero router: weights 1/E, W_down scaled by E/k)"
        return "approximate: without renormalisation exact only with --router zero"


def plan_upcycle(folder: Path, options: UpcycleOptions) -> UpcyclePlan:
    """Check everything that can be checked from config.json and the shard headers."""
    checkpoint = Checkpoint(folder)
    dense = _dense_family(checkpoint)
    family = resolve_target(dense, options.arch)
    _check_options(options, family)
    ffn_keys, prefixes = _ffn_keys(checkpoint, dense)
    first = ffn_keys[min(ffn_keys)]
    width, hidden = checkpoint.tensors[first["gate"]].shape
    dtype = checkpoint.tensors[first["gate"]].dtype
    expert_width, shared_width = _widths(options, family, width)
    renorm = family.router.renorm == "always" or options.norm_topk_prob
    routed, shared = scales(options.method, options.experts, options.top_k, renorm,
                            bool(shared_width))
    plan = UpcyclePlan(checkpoint, dense, family, options, ffn_keys, prefixes, hidden, width,
                       dtype, expert_width, shared_width, renorm, routed, shared)
    qkv_bias = any(k.endswith("self_attn.q_proj.bias") for k in checkpoint.tensors)
    if qkv_bias and TARGETS[family.name].attention_bias is None:
        raise InvalidArgumentError(f"the dense attention has biases, which {family.name} "
                                   "cannot hold", "choose another target")
    plan.shape = MoeShape(options.experts, options.top_k, expert_width, shared_width, renorm,
                          options.aux_loss_coef, qkv_bias)
    plan.config = build_config(checkpoint.config, family, plan.shape)
    return plan


def scales(method: str, experts: int, top_k: int, renorm: bool,
           shared: bool) -> tuple[float, float]:
    """(routed W_down scale, shared W_down scale).

    Granularity G = E for split (each expert holds 1/E of the neurons), 1 otherwise. With
    renormalised top-k the k weights sum to 1, so routed experts need x G; without it each
    weight is about 1/E under a uniform router, so x E*G/k (Megatron's E*G^2/T with
    E_rate = E/G). Shared expert (Qwen2-MoE, gate sigmoid(0) = 1/2 with a zero gate): for
    split it holds its own neurons, W_down x 2; for copy/drop it is the whole dense FFN and
    both paths carry half: shared x 1 (times 1/2 from the gate), routed x 1/2.
    """
    granularity = experts if method == "split" else 1
    routed = float(granularity) if renorm else experts * granularity / top_k
    if not shared:
        return routed, 1.0
    if method == "split":
        return routed, 2.0
    return routed * 0.5, 1.0


def _dense_family(checkpoint: Checkpoint) -> DenseFamily:
    resolved = resolve(checkpoint.config)
    if isinstance(resolved.family, MoeFamily):
        raise InvalidArgumentError(
            f"{checkpoint.folder} is already an MoE model ({resolved.family.name})",
            "upcycle takes a dense checkpoint; use prune/merge on MoE models")
    if resolved.config_path:
        raise UnsupportedModelError(
            f"{resolved.family.name} nests its text model under {'.'.join(resolved.config_path)}",
            "upcycle takes a text-only dense checkpoint")
    return resolved.family


def _check_options(opts: UpcycleOptions, family: MoeFamily) -> None:
    _choice("--method", opts.method, METHODS)
    _choice("--router", opts.router, ROUTERS)
    _choice("--split-order", opts.split_order, SPLIT_ORDERS)
    if opts.experts < 2:
        raise InvalidArgumentError(f"--experts must be at least 2, got {opts.experts}")
    if not 1 <= opts.top_k <= opts.experts:
        raise InvalidArgumentError(f"--top-k {opts.top_k} is not in 1..{opts.experts}",
                                   f"a token can use at most the {opts.experts} experts")
    if not 0.0 <= opts.drop_ratio <= 1.0:
        raise InvalidArgumentError(f"--drop-ratio must be in [0, 1], got {opts.drop_ratio}")
    if opts.router_std < 0:
        raise InvalidArgumentError(f"--router-std must be >= 0, got {opts.router_std}")
    shared = opts.shared_expert or opts.shared_neurons is not None
    if shared and not family.shared_prefixes:
        able = ", ".join(f.name for f in MOE_FAMILIES if f.dense_source and f.shared_prefixes)
        raise InvalidArgumentError(f"{family.name} has no shared expert",
                                   f"targets with one: {able}")
    if opts.shared_neurons is not None and opts.method != "split":
        raise InvalidArgumentError("--shared-neurons applies to --method split",
                                   "copy and drop use the whole dense FFN as shared expert")
    if family.router.renorm == "always" and not opts.norm_topk_prob:
        raise InvalidArgumentError(f"{family.name} always renormalises its top-k weights",
                                   "drop --no-norm-topk-prob")
    needs_data = opts.router == "data" or (opts.method == "split" and opts.split_order == "cluster")
    if needs_data and not opts.data.sources:
        what = "--router data" if opts.router == "data" else "--split-order cluster"
        raise InvalidArgumentError(f"{what} needs calibration text", "pass --data FILE")
    if opts.data.sources and not needs_data:
        raise InvalidArgumentError("--data is only used by --router data and --split-order "
                                   "cluster", "drop --data or choose one of those")


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidArgumentError(f"{flag} '{value}' is not one of {', '.join(allowed)}")


def _widths(opts: UpcycleOptions, family: MoeFamily, width: int) -> tuple[int, int | None]:
    """(expert width, shared width or None when the family has no shared expert)."""
    has_shared_slot = bool(family.shared_prefixes)
    shared_on = opts.shared_expert or opts.shared_neurons is not None
    if opts.method != "split":
        return width, (width if shared_on else 0) if has_shared_slot else None
    shared = opts.shared_neurons or 0
    if shared_on and not shared:
        raise InvalidArgumentError("split with a shared expert needs --shared-neurons N",
                                   f"N neurons of {width} go to the shared expert; "
                                   f"(I - N) must be divisible by --experts")
    if not 0 <= shared < width:
        raise InvalidArgumentError(f"--shared-neurons must be in 0..{width - 1}, got {shared}")
    routed = width - shared
    if routed % opts.experts:
        valid = [d for d in range(2, routed + 1) if routed % d == 0][:16]
        raise InvalidArgumentError(
            f"split cannot cut {routed} neurons into {opts.experts} equal experts",
            f"valid --experts: {', '.join(map(str, valid))}")
    return routed // opts.experts, (shared if has_shared_slot else None)


def _ffn_keys(checkpoint: Checkpoint, dense: DenseFamily
              ) -> tuple[dict[int, dict[str, str]], dict[int, str]]:
    """The dense FFN tensors of every layer, checked complete and of one shape."""
    patterns = {role: re.compile(rf"^(?P<prefix>(?:.*\.)?layers\.(?P<i>\d+)\.)"
                                 rf"{re.escape(dense.mlp[role])}$") for role in ROLES}
    keys: dict[int, dict[str, str]] = {}
    prefixes: dict[int, str] = {}
    for name in checkpoint.keys():
        for role, pattern in patterns.items():
            match = pattern.match(name)
            if match:
                layer = int(match["i"])
                keys.setdefault(layer, {})[role] = name
                prefixes[layer] = match["prefix"]
    ffn = {name for roles in keys.values() for name in roles.values()}
    extra = [n for n in checkpoint.keys() if n not in ffn and any(
        n.startswith(prefixes[layer] + "mlp.") for layer in prefixes)]
    if extra:
        raise UnsupportedModelError(f"the dense FFN has tensors besides gate/up/down weights, "
                                    f"e.g. '{extra[0]}'", "FFN biases cannot be upcycled")
    if not keys:
        raise CheckpointError(f"no dense FFN tensor '*.layers.N.{dense.mlp['gate']}' found",
                              "is the checkpoint quantised or renamed?")
    for layer, roles in keys.items():
        if len(roles) != 3:
            raise CheckpointError(f"layer {layer} lacks FFN tensors "
                                  f"{sorted(set(ROLES) - set(roles))}")
        gate, up, down = (checkpoint.tensors[roles[r]].shape for r in ROLES)
        if len(gate) != 2 or gate != up or down != gate[::-1]:
            raise CheckpointError(f"layer {layer} FFN shapes gate {list(gate)}, up {list(up)}, "
                                  f"down {list(down)} are not [I, H], [I, H], [H, I]")
    shapes = {checkpoint.tensors[roles["gate"]].shape for roles in keys.values()}
    if len(shapes) != 1:
        raise CheckpointError(f"FFN widths differ across layers: {sorted(shapes)}",
                              "upcycle needs one intermediate size")
    return dict(sorted(keys.items())), prefixes
