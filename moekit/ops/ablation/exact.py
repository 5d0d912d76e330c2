"""Exact ablation: the loss and KL change of removing one expert from one layer's routing.

For MoE layer l and expert e, the ablated model routes layer l's tokens among the other experts
(`variants.VariantHooks`); every other layer is unchanged. On the sample's predicted positions
t (S-1 per window of S tokens), with p the unablated and q the ablated next-token distribution:

    dNLL_{l,e}(t) = -log q(x_{t+1}) + log p(x_{t+1}),
    KL_{l,e}(t)   = sum_v p(v) (log p(v) - log q(v))         (KL(p || q), as `moekit eval`).

One plain forward per batch records every MoE decoder layer's input h_l [B, S, H] and the
unablated log-probabilities. Then, per layer l, the E variants run from layer l to the head in
passes of V variants: the model's own forward on the ids repeated V times, with layers < l
replaced by stubs that hand over h_l (`runtime.layers.stubbed`), so masks, rotary embeddings,
final norm and LM head are the model's. Cost per layer: E x (L - l) decoder layers + E heads on
the sample, against L layers + 1 head for one plain forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moekit.ops.ablation.variants import VariantHooks
from moekit.runtime.layers import LayerCall, find_stack, stubbed

if TYPE_CHECKING:
    import torch

    from moekit.calib.capture import MoeBlock
    from moekit.calib.routing import Routing

LOGIT_BUDGET = 512 * 2**20  # bytes of float32 log-probabilities per variant pass


def layer_inputs(model: Any, blocks: list[MoeBlock], ids: torch.Tensor
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({layer: h_l [B, S, H]} entering each MoE decoder layer, logits [B, S, V]) of one plain
    forward."""
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for block in blocks:
        def grab(module: Any, args: tuple, kwargs: dict, layer: int = block.layer) -> None:
            inputs[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
        handles.append(block.decoder_layer.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return inputs, logits


def run_from(model: Any, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
             copies: int) -> torch.Tensor:
    """Logits [copies*B, S, V] of the model run from decoder layer `layer` on, its input being
    `hidden` [B, S, H] repeated `copies` times (rows j*B..(j+1)*B-1 are copy j)."""
    stack = find_stack(model)
    real = list(stack.layers)
    start = hidden.repeat(copies, 1, 1)

    def on_call(index: int, h: Any, args: tuple, kwargs: dict) -> Any:
        if index < layer - 1:
            return h
        if index == layer - 1:
            return start
        return LayerCall(args, kwargs)(real[index], h)

    with stubbed(stack, on_call):
        return model(input_ids=ids.repeat(copies, 1), use_cache=False).logits


def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax [.., S-1, V] (float32) of the predictions that have a next token."""
    return logits[..., :-1, :].float().log_softmax(-1)


def exact_layer(model: Any, block: MoeBlock, routing: Routing, logits_index: int,
                hidden: torch.Tensor, ids: torch.Tensor, base: torch.Tensor,
                variants: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t dNLL [V], sum_t KL [V]) (float64) for one layer on one batch, variant j removing
    expert `variants[j]` (-1: none, routing as a layer with one expert fewer would: the
    group-limit lift alone); `base` is the unablated log-probabilities [B, S-1, V]."""
    import torch

    batch, steps, vocab = base.shape
    per_variant = max(1, LOGIT_BUDGET // max(1, 3 * batch * steps * vocab * 4))
    targets = ids[:, 1:].unsqueeze(-1)
    base_nll = -base.gather(-1, targets).squeeze(-1)
    base_p = base.exp()
    loss = torch.zeros(len(variants), dtype=torch.float64)
    kl = torch.zeros(len(variants), dtype=torch.float64)
    for start in range(0, len(variants), per_variant):
        removed = variants[start:start + per_variant]
        with VariantHooks(block, routing, logits_index, removed):
            logits = run_from(model, block.layer, hidden, ids, len(removed))
        logp = next_token_logprobs(logits).view(len(removed), batch, steps, vocab)
        del logits
        nll = -logp.gather(-1, targets.expand(len(removed), -1, -1, -1)).squeeze(-1)
        loss[start:start + len(removed)] = (nll - base_nll).double().sum((1, 2)).cpu()
        # sum_v p (log p - log q), differences first: KL is often far below the entropy
        div = (base_p * (base - logp)).sum(-1)
        kl[start:start + len(removed)] = div.double().sum((1, 2)).cpu()
    return loss, kl
