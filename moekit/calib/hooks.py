"""Hooks that feed a Recorder from a transformers MoE model, driven by the family record.

Where they attach (paths from `RouterSpec`, relative to the decoder layer `*.layers.{i}`):

- router (`RouterSpec.module`): forward hook; `output[logits_index]` is the raw logits [T, E],
  used for the routing entropy.
- experts (`RouterSpec.experts_module`) of families whose Experts class is decorated with
  `@use_experts_implementation`: a registered experts implementation, `moekit_trace`, receives
  `(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])` - the model's own routing - and
  computes every selected expert's *unweighted* output f_e(x_t) with the implementation the model
  was using (grouped_mm by default), then combines them exactly as that implementation does, so
  logits are bit-identical (eager: equal up to float summation order when k > 2).
- `RouterSpec.input_scaled` families (Llama-4: the router returns dense scores, the score scales
  the experts' *input*, every expert runs on every token): the router hook takes the top-k ids
  with the same `topk` call as the router and the weights from the scores; a forward hook on the
  experts reads the contributions f_e(s * x) actually added to the residual stream, and f_e(x) is
  recomputed for the routed slots from the fused weights with transformers' grouped_mm kernel.
  There, REAP = sum ||f_e(s * x)|| (the contribution's norm), EAN = sum ||f_e(x)||.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from moekit.calib.recorder import Recorder
from moekit.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

    from moekit.families.spec import ExpertLayout, MoeFamily

TRACE_IMPLEMENTATION = "moekit_trace"


@dataclass(frozen=True)
class MoeModules:
    """The router and experts modules of one MoE decoder layer."""

    layer: int
    router: Any
    experts: Any

    @property
    def num_experts(self) -> int:
        return int(getattr(self.experts, "num_experts", 0) or self.router.num_experts)


def find_moe_modules(model: Any, family: MoeFamily) -> list[MoeModules]:
    """Locate `*.layers.{i}.<router.module>` and `.<router.experts_module>` by module name."""
    spec = family.router
    pattern = re.compile(r"^(?P<stack>(?:.*\.)?layers)\.(?P<i>\d+)\.(?P<rest>.+)$")
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for name, module in model.named_modules():
        match = pattern.match(name)
        if match and match["rest"] in (spec.module, spec.experts_module):
            role = "router" if match["rest"] == spec.module else "experts"
            found.setdefault((match["stack"], int(match["i"])), {})[role] = module
    complete = [(stack, i) for (stack, i), parts in found.items() if len(parts) == 2]
    stacks = [stack for stack, _ in complete]
    main = max(set(stacks), key=stacks.count) if stacks else ""  # the decoder stack
    layers = [MoeModules(i, found[(stack, i)]["router"], found[(stack, i)]["experts"])
              for stack, i in sorted(complete, key=lambda key: key[1]) if stack == main]
    if not layers:
        raise UnsupportedModelError(
            f"no module named '*.layers.N.{spec.module}' with a sibling '{spec.experts_module}' "
            f"in this {family.name} model", "the modeling code differs from the family record")
    return layers


def trace_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The `moekit_trace` experts implementation: same result as the wrapped implementation,
    plus a call `self._moekit_sink(top_k_index, top_k_weights, per_slot [T, k, H])`."""
    import torch

    inner = getattr(self, "_moekit_inner", None) or _default_inner()
    sink = getattr(self, "_moekit_sink", None)
    if sink is None:
        return inner(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, k = top_k_index.shape
    repeated = hidden_states.repeat_interleave(k, dim=0)  # one row per (token, slot)
    ones = torch.ones((num_tokens * k, 1), dtype=top_k_weights.dtype,
                      device=top_k_weights.device)
    per_slot = inner(self, repeated, top_k_index.reshape(-1, 1), ones).view(num_tokens, k, -1)
    sink(top_k_index, top_k_weights, per_slot)
    return (per_slot * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden_states.dtype)


def _default_inner() -> Any:
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward


def register_trace_implementation() -> None:
    """Add `moekit_trace` to transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(TRACE_IMPLEMENTATION, trace_experts_forward)


def _inner_implementation(experts: Any, name: str | None) -> Any:
    """The function the experts module ran before: a registered implementation, or its eager
    forward (kept by `functools.wraps` as `__wrapped__`)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if name and name != "eager" and name != TRACE_IMPLEMENTATION and name in ALL_EXPERTS_FUNCTIONS:
        return ALL_EXPERTS_FUNCTIONS[name]
    return getattr(type(experts).forward, "__wrapped__", None) or _default_inner()


class RoutingHooks:
    """Attach the recording hooks to `model` (a context manager); detaching restores the
    model's experts implementation and removes every hook."""

    def __init__(self, model: Any, family: MoeFamily, recorder: Recorder, device: Any = None):
        """`device`: where the accumulators live (default: each experts module's device; a
        streamed model's layers are on `meta` until loaded, so the engine passes its device)."""
        self.model, self.family, self.recorder = model, family, recorder
        self.device = device
        self.modules = find_moe_modules(model, family)
        self._handles: list[Any] = []
        self._previous: str | None = None
        self._traced: list[Any] = []

    def __enter__(self) -> RoutingHooks:
        try:
            self.attach()
        except BaseException:
            self.detach()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        spec = self.family.router
        decorated = not spec.input_scaled
        if decorated:
            register_trace_implementation()
            self._previous = getattr(self.model.config, "_experts_implementation", None)
        for mods in self.modules:
            device = self.device or module_device(mods.experts)
            acc = self.recorder.add_layer(mods.layer, mods.num_experts, device)
            handler = _LayerHandler(self.recorder, acc, self.family)
            self._handles.append(mods.router.register_forward_hook(handler.on_router))
            if decorated:
                if not hasattr(mods.experts, "has_gate"):
                    raise UnsupportedModelError(
                        f"{type(mods.experts).__name__} does not use transformers' experts "
                        "interface", "set input_scaled in the family record or update transformers")
                mods.experts._moekit_inner = _inner_implementation(mods.experts, self._previous)
                mods.experts._moekit_sink = handler.on_experts
                mods.experts._moekit_norm_sink = handler.on_norms
                self._traced.append(mods.experts)
            else:
                handler.scaled_router = True
                self._handles.append(mods.experts.register_forward_hook(handler.on_scaled_experts))
        if decorated:
            self.model.set_experts_implementation(TRACE_IMPLEMENTATION)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for experts in self._traced:
            for attr in ("_moekit_sink", "_moekit_norm_sink", "_moekit_inner"):
                if hasattr(experts, attr):
                    delattr(experts, attr)
        self._traced.clear()
        if self._previous is not None:
            self.model.set_experts_implementation(self._previous)
            self._previous = None


def module_device(module: Any) -> Any:
    """The device of `module`'s first parameter (CPU when it has none): where its inputs go."""
    import torch

    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class _LayerHandler:
    """The callbacks of one MoE layer, closing over its accumulator."""

    def __init__(self, recorder: Recorder, acc: Any, family: MoeFamily):
        self.recorder, self.acc, self.layout = recorder, acc, family.experts
        self.scoring, self.logits_index = family.router.scoring, family.router.logits_index
        self.scaled_router = False
        self.pending: tuple[Any, Any, Any] | None = None

    def on_router(self, module: Any, args: tuple, output: Any) -> None:
        import torch

        outputs = output if isinstance(output, tuple) else (output,)
        logits = outputs[self.logits_index]
        self.acc.add_entropy(self.recorder.domain, logits, self.scoring)
        if self.scaled_router:
            hidden = args[0].reshape(-1, args[0].shape[-1])
            ids = torch.topk(logits, module.top_k, dim=1)[1]  # the router's own call
            self.pending = (hidden, ids, outputs[0].gather(1, ids))

    def on_experts(self, ids: torch.Tensor, weights: torch.Tensor, per_slot: torch.Tensor) -> None:
        import torch

        self.on_norms(ids, weights, torch.linalg.vector_norm(per_slot, dim=-1, dtype=torch.float32))

    def on_norms(self, ids: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor) -> None:
        """Per-slot norms ||f_e(x_t)|| [T, k] computed elsewhere (streamed expert groups)."""
        self.acc.add_routing(self.recorder.domain, self.recorder.shape, ids, weights, norms)

    def on_scaled_experts(self, module: Any, args: tuple, output: torch.Tensor) -> None:
        """Llama-4: output rows e*T + t hold f_e(s_te * x_t) for every expert e and token t."""
        import torch

        if self.pending is None:
            return
        hidden, ids, weights = self.pending
        self.pending = None
        num_tokens, k = ids.shape
        rows = ids * num_tokens + torch.arange(num_tokens, device=ids.device).unsqueeze(1)
        contrib = output.reshape(-1, output.shape[-1])[rows.reshape(-1)]
        contrib_norms = torch.linalg.vector_norm(contrib, dim=-1, dtype=torch.float32)
        unscaled = _fused_expert_outputs(module, hidden.repeat_interleave(k, dim=0),
                                         ids.reshape(-1, 1), self.layout)
        norms = torch.linalg.vector_norm(unscaled, dim=-1, dtype=torch.float32)
        self.acc.add_routing(self.recorder.domain, self.recorder.shape, ids, weights,
                             norms.view(num_tokens, k), contrib_norms.view(num_tokens, k))


def _fused_expert_outputs(experts: Any, rows: torch.Tensor, ids: torch.Tensor,
                          layout: ExpertLayout) -> torch.Tensor:
    """f_e(x) for rows [N, H] and ids [N, 1] from the fused `gate_up_proj` and `down_proj`
    (Llama-4: transposed [E, H, 2I] / [E, I, H], gate then up): act(x W_g) * (x W_u) W_d,
    computed by transformers' grouped_mm experts kernel (only the routed rows, not all E x T).
    `layout` (the family's ExpertLayout) says transposed or not, concatenated or interleaved."""
    import torch
    from transformers.integrations.moe import grouped_mm_experts_forward

    def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
        if layout.interleaved:
            gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        else:
            gate, up = gate_up.chunk(2, dim=-1)
        return up * experts.act_fn(gate)

    shim = SimpleNamespace(
        gate_up_proj=experts.gate_up_proj, down_proj=experts.down_proj, has_gate=True,
        has_bias=False, is_transposed=layout.transposed, has_post_expert_norm=False,
        _is_expert_parallel=False, num_experts=experts.gate_up_proj.shape[0],
        _apply_gate=apply_gate, act_fn=experts.act_fn)
    ones = torch.ones(ids.shape, dtype=rows.dtype, device=rows.device)
    return grouped_mm_experts_forward(shim, rows, ids, ones)
