"""A family's top-k routing, from router logits, driven by its `RouterSpec` and config.

`route(logits, routing, bias, keep)` returns what the family's router module would return if only
the experts `keep` existed (their logits columns and selection-bias entries, in order), i.e. the
routing of the pruned checkpoint, with ids mapped back to the original expert ids:

- scores s = softmax(z) or sigmoid(z) (over the kept experts only), or, `topk_first`, top-k on the
  raw logits z and the scoring applied to the k chosen logits (gpt-oss, granite);
- selection on s + b (selection bias b, DeepSeek-V3 / ERNIE / MiniMax), optionally group-limited:
  groups scored by their max (softmax) or top-2 sum (sigmoid), `topk_group` groups allowed;
- weights w = s[chosen], divided by their sum when renormalising (clamped at `renorm_min`),
  times `routed_scaling_factor` when the spec says `scaled`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from moekit.errors import UnsupportedModelError
from moekit.families.registry import first_value

if TYPE_CHECKING:
    import torch

    from moekit.families.spec import MoeFamily


@dataclass(frozen=True)
class Routing:
    """Everything `route` needs; built by `Routing.of(family, text_config)`."""

    scoring: str
    topk_first: bool
    top_k: int
    renorm: bool
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    renorm_min: float = 0.0
    renorm_eps: float = 0.0

    @staticmethod
    def of(family: MoeFamily, config: dict[str, Any], position: int = 0) -> Routing:
        """The routing of `family` under `config` (the text config dict)."""
        spec, keys = family.router, family.keys
        if spec.input_scaled or "sparsemixer" in spec.note:
            raise UnsupportedModelError(f"{family.name}: routing '{spec.describe()}' is not "
                                        "replayable from logits", "use a stats-only criterion")
        top_k = first_value(config, keys.top_k)
        top_k = int(top_k[position] if isinstance(top_k, list) else top_k)
        renorm = spec.renorm == "always" or (
            spec.renorm == "config" and bool(first_value(config, keys.renorm, False)))
        scaling = float(first_value(config, keys.scaling_factor, 1.0) or 1.0) if spec.scaled \
            else 1.0
        n_group, topk_group = 1, 1
        if spec.grouped and config.get("topk_method") != "greedy":
            n_group = int(first_value(config, keys.n_group, 1) or 1)
            topk_group = int(first_value(config, keys.topk_group, 1) or 1)
        eps = 1e-20 if spec.scoring == "sigmoid" and spec.grouped else 0.0
        return Routing(spec.scoring, spec.topk_first, top_k, renorm, scaling, n_group,
                       topk_group, float(config.get("moe_norm_min") or 0.0), eps)

    def after_prune(self, config_changes: dict[str, int]) -> Routing:
        """The routing of the pruned checkpoint (plan.config_changes may flatten the groups)."""
        if "n_group" in config_changes:
            return replace(self, n_group=int(config_changes["n_group"]),
                           topk_group=int(config_changes.get("topk_group", 1)))
        return self


def route(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None,
          keep: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, k] original expert ids, weights [T, k] float32) for logits z [T, E] (float32),
    routing among `keep` (all experts when None)."""
    import torch

    z, bias, keep_t = _kept(logits, bias, keep)
    k = routing.top_k
    if routing.topk_first:
        top, ids = torch.topk(z, k, dim=-1)
        weights = top.softmax(-1) if routing.scoring == "softmax" else top.sigmoid()
    else:
        scores, choice = _scored(z, routing, bias)
        if routing.n_group > 1:
            choice = _group_mask(choice, routing)
        ids = torch.topk(choice, k, dim=-1)[1]
        weights = scores.gather(1, ids)
    if routing.renorm and not routing.topk_first:
        total = weights.sum(-1, keepdim=True) + routing.renorm_eps
        weights = weights / (total.clamp(min=routing.renorm_min) if routing.renorm_min else total)
    weights = weights * routing.scaling
    if keep_t is not None:
        ids = keep_t[ids]
    return ids, weights


def selection_values(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None,
                     keep: list[int] | None = None) -> torch.Tensor:
    """The values `route` takes the top k of, before any group mask, [T, len(keep)]: the
    logits when `topk_first`, else the scores (over `keep`) plus the selection bias."""
    z, bias, _ = _kept(logits, bias, keep)
    return z if routing.topk_first else _scored(z, routing, bias)[1]


def _kept(logits: torch.Tensor, bias: torch.Tensor | None, keep: list[int] | None,
          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(z [T, K] float32, bias [K] or None, keep as a tensor or None): the kept columns."""
    import torch

    z = logits.float()
    if bias is not None:
        bias = bias.to(z.device)  # e.g. CPU logits replayed with a CUDA module's bias, or back
    keep_t = None
    if keep is not None:
        keep_t = torch.as_tensor(keep, dtype=torch.long, device=z.device)
        z = z.index_select(1, keep_t)
        if bias is not None:
            bias = bias.reshape(-1).index_select(0, keep_t)
    return z, bias, keep_t


def _scored(z: torch.Tensor, routing: Routing,
            bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores s, selection values s + b) of kept logits z [T, K] (bias b already kept)."""
    scores = z.softmax(-1) if routing.scoring == "softmax" else z.sigmoid()
    choice = scores + bias.float().reshape(1, -1) if bias is not None else scores
    return scores, choice


def _group_mask(choice: torch.Tensor, routing: Routing) -> torch.Tensor:
    """DeepSeek group-limited selection: -inf outside the `topk_group` best groups."""
    import torch

    t, e = choice.shape
    grouped = choice.view(t, routing.n_group, e // routing.n_group)
    if routing.scoring == "sigmoid":
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best = torch.topk(group_scores, routing.topk_group, dim=-1)[1]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return choice.masked_fill(~mask.repeat_interleave(e // routing.n_group, dim=1), -math.inf)


def selection_bias(block: Any) -> torch.Tensor | None:
    """The `e_score_correction_bias` buffer/parameter under an MoE block (None without one)."""
    for name, tensor in [*block.named_buffers(), *block.named_parameters()]:
        if name.endswith("e_score_correction_bias"):
            return tensor.detach()
    return None
