"""An independent ablation: a copy of a transformers model whose MoE block at one layer is
rebuilt by transformers with one expert fewer (router rows, selection bias and expert weights
sliced; group-limited routing falls back to plain top-k, as `moekit prune` writes it)."""

from __future__ import annotations

import copy
from typing import Any


def remove_expert(model: Any, family: Any, layer: int, expert: int) -> Any:
    """A deep copy of `model` in which MoE layer `layer` no longer has `expert` (-1: keeps all
    its experts, but its routing is flattened to plain top-k as with one expert fewer)."""
    import torch

    from moekit.calib.capture import moe_blocks

    model = copy.deepcopy(model)
    block = next(b for b in moe_blocks(model, family) if b.layer == layer)
    num = int(block.experts.num_experts)
    config = copy.deepcopy(model.config.get_text_config())
    key = next(k for k in family.keys.num_experts if hasattr(config, k))
    setattr(config, key, num - (expert >= 0))
    if family.router.grouped and int(getattr(config, "n_group", 1) or 1) > 1:
        config.n_group, config.topk_group = 1, 1
    keep = torch.tensor([j for j in range(num) if j != expert])
    state = {name: (t.index_select(0, keep) if t.ndim and t.shape[0] == num else t)
             for name, t in block.block.state_dict().items()}
    fresh = type(block.block)(config).to(dtype=next(block.block.parameters()).dtype)
    fresh.load_state_dict(state, strict=True)
    parent_name, _, attr = _name_of(model, block.block).rpartition(".")
    setattr(model.get_submodule(parent_name), attr, fresh.eval())
    return model


def _name_of(model: Any, module: Any) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def nll_and_kl(model: Any, ref: Any, ids: Any) -> tuple[float, float]:
    """(sum of next-token NLL of `model`, sum of KL(ref || model)) over ids [B, S] (float64)."""
    import torch

    with torch.no_grad():
        logp = model(input_ids=ids).logits[:, :-1].double().log_softmax(-1)
        ref_logp = ref(input_ids=ids).logits[:, :-1].double().log_softmax(-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum()
    kl = (ref_logp.exp() * (ref_logp - logp)).sum()
    return float(nll), float(kl)
