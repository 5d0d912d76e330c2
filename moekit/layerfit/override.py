"""Make an in-memory transformers model behave like its pruned checkpoint, layer by layer.

For every overridden MoE layer a forward hook on the router keeps its logits z [T, E], and a
forward pre-hook on the experts module replaces the routing it is called with (its second and
third parameters: top-k ids and weights, by position or keyword) by the routing among the kept
experts, `calib.routing.route(z, routing', b, K)`, so the experts run once, on that routing. No
weight is sliced: dropped experts simply never receive a token, and kept experts use whatever
weights the module holds (refitted down projections included). Used to let later layers see
earlier layers' pruned outputs and to score candidate plans end to end on held-out tokens.

`keep` may be a function called on every forward: it returns the kept ids for the tokens now
running, or None to leave the layer as it is (the layer-streaming passes run several
candidates' token copies through one materialised layer, `layerfit.lanes`). The selection bias is
read at call time, so hooks can be added to a streamed model's layers before they are loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moekit.calib.routing import Routing, route, selection_bias

if TYPE_CHECKING:
    from moekit.calib.capture import MoeBlock


class PrunedLayers:
    """Context manager / handle set: `add(block, keep, routing)` overrides one layer."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def __enter__(self) -> PrunedLayers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def add(self, block: MoeBlock, keep: list[int] | Callable[[], list[int] | None],
            routing: Routing, logits_index: int) -> None:
        state: dict[str, Any] = {}
        kept = keep if callable(keep) else (lambda: keep)
        signature = inspect.signature(block.experts.forward)  # (hidden, ids, weights, ...)
        names = list(signature.parameters)

        def on_router(module: Any, args: tuple, output: Any) -> None:
            outputs = output if isinstance(output, tuple) else (output,)
            z = outputs[logits_index]
            state["logits"] = z.reshape(-1, z.shape[-1])

        def on_experts(module: Any, args: tuple, kwargs: dict) -> Any:
            logits, ids = state.pop("logits", None), kept()
            if ids is None or logits is None:
                return None
            bound = signature.bind(*args, **kwargs)
            hidden = bound.arguments[names[0]]
            ids, weights = route(logits, routing, selection_bias(block.block), ids)
            bound.arguments[names[1]] = ids.to(hidden.device)
            bound.arguments[names[2]] = weights.to(hidden.dtype)
            return bound.args, bound.kwargs

        self._handles += [block.router.register_forward_hook(on_router),
                          block.experts.register_forward_pre_hook(on_experts, with_kwargs=True)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
