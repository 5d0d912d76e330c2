"""Routing one MoE layer of an in-memory model among different kept sets in one batched pass.

A batch of V variants stacks V copies of the same B windows: token rows [j*B*S, (j+1)*B*S) of
the layer's flattened input belong to variant j. A forward hook on the router keeps its raw
logits z [V*B*S, E]; a forward pre-hook on the experts module replaces the model's own routing
`(top_k_index, top_k_weights)` of variant j's rows by

    (ids, w) = calib.routing.route(z_rows, routing_j, b, keep_j),

the family's own top-k among `keep_j` (selection bias b, groups, renormalisation and scaling
included), so the experts module runs its usual math on the re-routed tokens. With one expert
removed, group-limited routing cannot keep balanced groups; as in the checkpoint that
`moekit prune --drop` writes, that layer then routes plain top-k (n_group = topk_group = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from moekit.calib.routing import Routing, route, selection_bias
from moekit.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

    from moekit.calib.capture import MoeBlock
    from moekit.families.layout import ModelLayout


def layer_routing(layout: ModelLayout, position: int) -> Routing:
    """The routing of the `position`-th MoE layer (raises for non-replayable routers)."""
    return Routing.of(layout.family, layout.config, position)


def removal_routing(routing: Routing, kept: int) -> Routing:
    """The routing of a layer left with `kept` experts: plain top-k when the groups cannot stay
    balanced (what the pruned config sets)."""
    if routing.n_group > 1 and kept % routing.n_group:
        return replace(routing, n_group=1, topk_group=1)
    return routing


def without(num_experts: int, expert: int) -> list[int]:
    """The kept set when `expert` is removed (-1: all experts)."""
    return [j for j in range(num_experts) if j != expert]


def reroute(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None, expert: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, k], weights [T, k] float32) with `expert` removed from routing (-1: none
    removed, but routed as a layer with one expert fewer: plain top-k for grouped routers)."""
    num = int(logits.shape[-1])
    return route(logits, removal_routing(routing, num - 1), bias, without(num, expert))


@dataclass
class VariantHooks:
    """Context manager on one MoE block: while `experts_removed` is set (one expert id per
    variant, V in all), the rows of variant j are routed with that expert removed."""

    block: MoeBlock
    routing: Routing
    logits_index: int
    experts_removed: list[int] | None = None

    def __post_init__(self) -> None:
        self.bias = selection_bias(self.block.block)
        self._logits: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> VariantHooks:
        self._handles = [
            self.block.router.register_forward_hook(self._on_router),
            self.block.experts.register_forward_pre_hook(self._on_experts)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_router(self, module: Any, args: tuple, output: Any) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        z = outputs[self.logits_index]
        self._logits = z.reshape(-1, z.shape[-1])

    def _on_experts(self, module: Any, args: tuple) -> tuple | None:
        import torch

        if self.experts_removed is None or self._logits is None:
            return None
        if len(args) < 3:
            raise UnsupportedModelError(
                f"{type(module).__name__} was not called as experts(hidden, ids, weights)",
                "ablation needs transformers' experts interface")
        hidden, ids, weights = args[0], args[1], args[2]
        logits, self._logits = self._logits, None
        rows = logits.shape[0] // len(self.experts_removed)
        new_ids, new_weights = [], []
        for j, expert in enumerate(self.experts_removed):
            i, w = reroute(logits[j * rows:(j + 1) * rows], self.routing, self.bias, expert)
            new_ids.append(i)
            new_weights.append(w)
        out_ids = torch.cat(new_ids).to(device=ids.device, dtype=ids.dtype)
        out_weights = torch.cat(new_weights).to(device=weights.device, dtype=weights.dtype)
        return (hidden, out_ids, out_weights, *args[3:])
