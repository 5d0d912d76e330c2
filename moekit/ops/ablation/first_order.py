"""First-order ablation estimate from one forward and one backward pass.

Let y_l(t) [H] be the routed output of MoE layer l at token t (what its experts module
returns) and N(t) the next-token NLL. Removing expert e re-routes layer l's tokens, changing
y_l(t) by

    dy_{l,e}(t) = sum_s w'_s f_{i'_s}(x_t) - sum_s w_s f_{i_s}(x_t),

(i, w) the model's routing, (i', w') `variants.reroute` (the family's top-k without e), f the
experts module's own math. To first order the summed loss changes by

    dL_{l,e} ~ sum_t < dL/dy_l(t), dy_{l,e}(t) >,    L = sum_t N(t),

with the gradient taken through the whole unablated model (a zero tensor added to every
layer's experts output is the differentiation point, so no path is cut). dy is computed only
on the rows whose routing changes (e among the chosen ids, or weights moved by more than
1e-6 relative: softmax routers without renormalisation re-weight every token). The KL to the
unablated model has zero gradient there, so it has no first-order estimate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moekit.calib.routing import selection_bias
from moekit.ops.ablation.variants import reroute

if TYPE_CHECKING:
    import torch

    from moekit.calib.capture import MoeBlock
    from moekit.calib.routing import Routing

RELATIVE_CHANGE = 1e-6


class _Tap:
    """Hooks of one block: router logits, experts inputs, and a zero `delta` added to the
    experts output (the point the gradient is taken at)."""

    def __init__(self, block: MoeBlock, logits_index: int):
        self.block, self.logits_index = block, logits_index
        self.logits = self.args = self.delta = None
        self.handles = [block.router.register_forward_hook(self.on_router),
                        block.experts.register_forward_hook(self.on_experts)]

    def on_router(self, module: Any, args: tuple, output: Any) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        z = outputs[self.logits_index]
        self.logits = z.detach().reshape(-1, z.shape[-1]).float()

    def on_experts(self, module: Any, args: tuple, output: Any) -> Any:
        import torch

        self.args = tuple(a.detach() for a in args[:3])
        self.delta = torch.zeros_like(output, requires_grad=True)
        return output + self.delta

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def first_order_batch(model: Any, blocks: list[MoeBlock], routings: list[Routing],
                      logits_index: int, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE layer, [E] float64: sum over the batch's predicted positions of the estimated
    NLL change when each expert is removed."""
    import torch

    taps = [_Tap(block, logits_index) for block in blocks]
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            logp = logits[:, :-1].to(_at_least_float(logits)).log_softmax(-1)
            loss = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum()
            grads = torch.autograd.grad(loss, [tap.delta for tap in taps])
    finally:
        for tap in taps:
            tap.remove()
    out = []
    for tap, routing, grad in zip(taps, routings, grads, strict=True):
        out.append(_layer_estimates(tap, routing, grad.reshape(-1, grad.shape[-1])))
    return out


def _layer_estimates(tap: _Tap, routing: Routing, grad: torch.Tensor) -> torch.Tensor:
    import torch

    hidden, ids, weights = tap.args
    hidden = hidden.reshape(-1, hidden.shape[-1])
    experts, bias = tap.block.experts, selection_bias(tap.block.block)
    num = int(tap.logits.shape[-1])
    estimates = torch.zeros(num, dtype=torch.float64)
    with torch.no_grad():
        for expert in range(num):
            new_ids, new_weights = reroute(tap.logits, routing, bias, expert)
            new_ids, new_weights = new_ids.to(ids.device), new_weights.to(weights.device)
            rows = changed_rows(ids, weights, new_ids, new_weights)
            if rows.numel() == 0:
                continue
            x = hidden[rows]
            after = experts(x, new_ids[rows].to(ids.dtype), new_weights[rows].to(weights.dtype))
            before = experts(x, ids[rows], weights[rows])
            estimates[expert] = (grad[rows].double() * (after - before).double()).sum().cpu()
    return estimates


def _at_least_float(tensor: torch.Tensor) -> torch.dtype:
    """float32, or float64 for a float64 model (tests compare against finite differences)."""
    import torch

    return torch.promote_types(tensor.dtype, torch.float32)


def changed_rows(ids: torch.Tensor, weights: torch.Tensor, new_ids: torch.Tensor,
                 new_weights: torch.Tensor) -> torch.Tensor:
    """Row indices whose set of chosen experts or their weights differ."""
    import torch

    order, new_order = ids.argsort(-1), new_ids.argsort(-1)
    same_ids = (ids.gather(1, order) == new_ids.gather(1, new_order)).all(-1)
    w, w_new = weights.float().gather(1, order), new_weights.float().gather(1, new_order)
    moved = ((w - w_new).abs() > RELATIVE_CHANGE * w.abs().clamp(min=1e-30)).any(-1)
    return torch.nonzero(~same_ids | moved).reshape(-1)
