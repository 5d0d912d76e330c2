"""Sub-layer streaming: a MoE layer whose routed experts do not fit runs in expert groups.

The layer's base (attention, norms, router, shared experts) is loaded as usual; the routed
experts (`RouterSpec.experts_module`, fused tensors [E, ...]) are read G experts at a time:

  1. every batch runs through the layer with the experts replaced by a recorder: it keeps the
     experts' input x [T, H], top-k ids [T, k] and weights w [T, k] (the router ran once, its
     hooks fired once) and returns zeros;
  2. for each group g = experts [a, a+G): its rows are read from disk (once per run), and for
     every batch the slots routed into g are computed, f_e(x_t) with the model's own experts
     implementation; y_t += w_ts f_e(x_t) accumulates in float32 and ||f_e(x_t)|| per slot;
     after the last group the hooks get every slot's norm (`_moekit_norm_sink`);
  3. every batch runs through the layer again with the router's hooks muted and the experts
     returning y, which gives the layer output.

Extra activations: x and y (float32), in RAM or spilled like the hidden states, and the
[T, k] ids/weights/norms of every batch (RAM). Families
whose experts are not called with (x, ids, weights) (Llama-4) cannot run in groups.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from moekit.errors import InvalidArgumentError, UnsupportedModelError
from moekit.runtime.hidden import HiddenStore
from moekit.units import human


def mark_grouped(engine: Any) -> None:
    """Flag the MoE layers that do not fit the budget whole (plan.group > 0)."""
    if not engine.plan.group:
        return
    from moekit.runtime.layers import find_stack

    stack = find_stack(engine.model)
    resident = engine.sizes.resident
    for i, layer in enumerate(stack.layers):
        path, count = routed_experts(layer, engine.family)
        if path is None or resident + engine.weights.nbytes(stack.prefix(i)) <= engine.plan.budget:
            continue
        if engine.family.router.input_scaled:
            raise UnsupportedModelError(
                f"layer {i} of this {engine.family.name} model does not fit --max-memory and "
                "its experts cannot run in groups", "raise --max-memory to hold one layer")
        layer._moekit_groups = (path, count, min(engine.plan.group, count))


def split_experts(engine: Any, layer: Any, name: str, prefix: str) -> bool:
    """True when tensor `name` is a routed-expert tensor read group by group."""
    groups = getattr(layer, "_moekit_groups", None)
    return bool(groups) and name.startswith(f"{prefix}{groups[0]}.")


def run_grouped(engine: Any, step: Any, before: Callable[[int], None] | None,
                progress: Callable[[int, float], None] | None, num_layers: int) -> None:
    """Run every batch through `step.module` with its experts in groups (module docstring)."""
    import torch

    path, count, group = step.module._moekit_groups
    experts = step.module.get_submodule(path)
    batches = range(len(step.calls))
    spill = (step.store.spill, engine.spill_dir, step.store.offload)
    inputs, routed = HiddenStore(engine.device, *spill), HiddenStore(engine.device, *spill)
    captured: dict[int, tuple[Any, Any]] = {}  # batch -> top-k ids, weights [T, k]
    current = [0]

    def record(hidden: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        captured[current[0]] = (top_k_index, top_k_weights)
        inputs.put(current[0], hidden)
        routed.put(current[0], torch.zeros(hidden.shape, dtype=torch.float32,
                                           device=hidden.device))
        return torch.zeros_like(hidden)

    try:
        with _forward(experts, record):
            for b in batches:
                current[0] = b
                if before is not None:
                    before(b)
                step.call(b)
        norms = _expert_groups(engine, step, experts, (path, count, group), captured,
                               (inputs, routed))
        _report(experts, captured, norms, before)
        with _forward(experts, lambda hidden, *_: routed.get(current[0]).to(hidden.dtype)), \
                _muted(step.module.get_submodule(engine.family.router.module)):
            for b in batches:
                current[0] = b
                if before is not None:
                    before(b)
                step.store.put(b, step.call(b))
                if progress is not None:
                    progress(b, 1.0 / num_layers)
    finally:
        inputs.close()
        routed.close()


def _expert_groups(engine: Any, step: Any, experts: Any, shape: tuple[str, int, int],
                   captured: dict[int, tuple[Any, Any]], stores: tuple[Any, Any]) -> dict:
    """Add y_t += w_ts f_e(x_t) group by group into the `routed` store (float32 [T, H]);
    returns the per-slot norms [T, k] of every batch."""
    import torch

    path, count, group = shape
    inputs, routed = stores
    names = [t.name for t in engine.weights.under(f"{step.prefix}{path}.")]
    norms = {b: torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
             for b, (ids, _) in captured.items()}
    inner = getattr(experts, "_moekit_inner", None) or type(experts).forward
    for start in range(0, count, group):
        stop = min(start + group, count)
        tensors = engine.weights.read(names, engine.device, rows=(start, stop),
                                      strip=f"{step.prefix}{path}.")
        with _weights(experts, tensors, stop - start):
            for b, (ids, weights) in captured.items():
                token, slot = ((ids >= start) & (ids < stop)).nonzero(as_tuple=True)
                if token.numel() == 0:
                    continue
                local = (ids[token, slot] - start).unsqueeze(1)
                ones = torch.ones(local.shape, dtype=weights.dtype, device=local.device)
                out = inner(experts, inputs.get(b)[token], local, ones).float()
                norms[b][token, slot] = torch.linalg.vector_norm(out, dim=-1)
                y = routed.get(b)
                y.index_add_(0, token, out * weights[token, slot].float().unsqueeze(1))
                routed.put(b, y)
        del tensors
    return norms


def _report(experts: Any, captured: dict, norms: dict, before: Callable[[int], None] | None
            ) -> None:
    """Hand every batch's routing and per-slot norms to the recording hooks, if attached."""
    sink = getattr(experts, "_moekit_norm_sink", None)
    if sink is None:
        return
    for b, (ids, weights) in captured.items():
        if before is not None:
            before(b)
        sink(ids, weights, norms[b])


@contextmanager
def _forward(module: Any, function: Callable[..., Any]) -> Any:
    """Replace `module.forward` for the duration (instance attribute over the class method)."""
    module.forward = function
    try:
        yield
    finally:
        del module.forward


@contextmanager
def _muted(module: Any) -> Any:
    """No forward hooks on `module` for the duration (the router ran once already)."""
    saved = module._forward_hooks
    module._forward_hooks = OrderedDict()
    try:
        yield
    finally:
        module._forward_hooks = saved


@contextmanager
def _weights(experts: Any, tensors: dict[str, Any], count: int) -> Any:
    """Give `experts` the rows of one group (and `num_experts = count`), then put the meta
    parameters back."""
    import torch

    saved = {name: experts._parameters[name] for name in tensors}
    saved_count = getattr(experts, "num_experts", None)
    try:
        for name, tensor in tensors.items():
            experts._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
        if saved_count is not None:
            experts.num_experts = count
        yield
    finally:
        experts._parameters.update(saved)
        if saved_count is not None:
            experts.num_experts = saved_count


def routed_experts(layer: Any, family: Any) -> tuple[str | None, int]:
    """(experts module path within the layer, expert count) of a MoE layer, else (None, 0)."""
    if family is None:
        return None, 0
    path = family.router.experts_module
    try:
        experts = layer.get_submodule(path)
    except AttributeError:
        return None, 0
    count = int(getattr(experts, "num_experts", 0) or 0)
    if not count:
        gate_up = getattr(experts, "gate_up_proj", None)
        count = int(gate_up.shape[0]) if gate_up is not None else 0
    return (path, count) if count else (None, 0)


def require_whole_layers(engine: Any, what: str) -> None:
    """Refuse an engine that runs some MoE layer in expert groups (`runtime.groups`): the
    block's hooks would fire once per pass there, and `what` needs the layer's experts."""
    from moekit.runtime.layers import find_stack

    if engine.mode != "stream" or not engine.plan.group:
        return
    layers = find_stack(engine.model).layers
    split = [i for i, layer in enumerate(layers) if getattr(layer, "_moekit_groups", None)]
    if split:
        need = engine.sizes.resident + max(engine.sizes.layers)
        raise InvalidArgumentError(
            f"--max-memory {human(engine.plan.budget)} holds only part of layer {split[0]}, "
            f"but {what} needs one whole MoE layer in memory",
            f"use --max-memory {human(need, up=True)} or more")
