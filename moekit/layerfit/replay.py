"""Replaying one MoE layer on cached tokens with some experts removed (re-routing included).

For token t with block input x_t and router logits z_t, the routed output of the layer when
only the experts K exist is

    y_K(x_t) = sum_{e in T_K(t)} g_e^K(t) f_e(x_t),

where (T_K, g^K) = `calib.routing.route(z_t, routing_K, bias, K)` is the family's own routing
among K and f_e(x) the expert's output, computed once by the transformers experts module
(`experts(x, top_k_index=[[e]], top_k_weights=[[1]])`: the family's exact expert math, biases and
clamps included). Only the experts a token can be re-routed to are cached: its top k + n by
selection score when the ranking among survivors cannot change (no groups; sigmoid scores, or
softmax without a selection bias), else all E. The damage of removing the complement of K is

    D(K) = (1/N) sum_t || y_E(x_t) - y_K(x_t) ||^2     (shared experts cancel).

D is evaluated without forming y_K: with the per-token Gram matrix G_t[m, m'] = <f_m, f_m'> and
c_t[m] = <y_E, f_m> of the cached outputs (float64, when `gram_fits`: M <= GRAM_MAX, or the
Gram is smaller than the outputs it stands for, 2 M <= H, as at every real width),
||y_E - y_K||^2 = ||y_E||^2 - 2 sum_s w_s c[m_s] + sum_{s,s'} w_s w_s' G[m_s, m_s'].

Memory: the outputs f are computed in token chunks (EXPERT_BYTES of float32 per call of the
experts module: a call has a large fixed cost, so chunks are not made smaller) and reduced to
y_E, G, c, ||y_E||^2 (float64 copies of CHUNK_BYTES at a time), so the N x M x H outputs exist
only when needed (not `gram_fits`, or `keep_outputs` for `output(keep)`), then in the experts' own
dtype (exact: the float32 values are those upcast).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from moekit.calib.hooks import module_device
from moekit.calib.routing import Routing, route
from moekit.runtime.engine import trim_heap

GRAM_MAX = 64
EXPERT_BYTES = 128 << 20  # float32 size of the expert outputs [n, M, H] of one experts call
CHUNK_BYTES = 32 << 20  # float64 copy of the expert outputs reduced to G, c at once

if TYPE_CHECKING:
    import torch


@dataclass
class LayerReplay:
    """Cached logits [N, E], candidate ids [N, M], their outputs [N, M, H] (the experts' dtype;
    None when G, c, ||y_E||^2 stand for them), slot map [N, E] (index into M, -1 when not
    cached) and the full layer's routed output [N, H] (float32)."""

    logits: torch.Tensor
    bias: torch.Tensor | None
    routing: Routing
    pruned_routing: Routing
    cand: torch.Tensor
    outs: torch.Tensor | None
    slot: torch.Tensor
    target: torch.Tensor
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    tnorm: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.logits.shape[1])

    def routed(self, keep: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, k], weights [N, k]) among `keep` (None: the unpruned routing). Kept sets
        that cannot be split evenly over the routing groups (single-expert removals scored for
        information) use plain top-k, as the pruned config would."""
        return route(self.logits, self.routing_for(keep), self.bias, keep)

    def routing_for(self, keep: list[int] | None) -> Routing:
        """The routing among `keep` (see `routed`)."""
        return routing_among(self.routing, self.pruned_routing, keep)

    def output(self, keep: list[int] | None, rows: slice = slice(None)) -> torch.Tensor:
        """y_K [n, H] for the cached tokens `rows` (keep=None: all experts); needs the outputs
        (`build_replay(keep_outputs=True)`)."""
        if self.outs is None:
            raise RuntimeError("the expert outputs were not kept (build_replay(keep_outputs="
                               "True)) (internal error)")
        ids, weights = self.routed(keep)
        return _combine(self.outs[rows], self.slot[rows], ids[rows], weights[rows])

    def error(self, keep: list[int], rows: slice = slice(None)) -> float:
        """D(K): mean squared norm of the change of the routed output, on tokens `rows`."""
        if self.gram is None or self.cross is None or self.tnorm is None:
            diff = self.target[rows] - self.output(keep, rows)
            return float(diff.pow(2).sum(-1).mean())
        ids, weights = self.routed(keep)
        return float(self.token_errors(ids[rows], weights[rows], rows).mean())

    def token_errors(self, ids: torch.Tensor, weights: torch.Tensor,
                     rows: Any = slice(None)) -> torch.Tensor:
        """||y_E(t) - y_K(t)||^2 [n] (float64, clamped at 0) of the tokens `rows` (a slice or
        index tensor) routed to `ids` [n, k] with `weights` [n, k], from G, c, ||y_E||^2
        (only the k + k^2 entries each token needs are gathered)."""
        import torch

        assert self.gram is not None and self.cross is not None and self.tnorm is not None
        num, k = ids.shape
        total, experts = self.slot.shape
        m = self.gram.shape[2]
        index = torch.arange(total)[rows] if isinstance(rows, slice) else rows
        slots = self.slot.view(-1)[(index * experts).unsqueeze(1) + ids]
        if bool((slots < 0).any()):
            raise RuntimeError("a re-routed expert output was not cached (internal error)")
        w = weights.double()
        cross = self.cross.view(-1)[(index * m).unsqueeze(1) + slots]
        pairs = (slots.unsqueeze(2) * m + slots.unsqueeze(1)).view(num, k * k)
        pair = self.gram.view(-1)[(index * m * m).unsqueeze(1) + pairs].view(num, k, k)
        sq = self.tnorm[index] - 2 * (w * cross).sum(1) + torch_einsum(w, pair)
        return sq.clamp(min=0)

def routing_among(routing: Routing, pruned_routing: Routing, keep: list[int] | None) -> Routing:
    """`routing` unpruned (keep None), else `pruned_routing`, as plain top-k when `keep` cannot
    be split evenly over its groups."""
    chosen = routing if keep is None else pruned_routing
    if keep is not None and len(keep) % chosen.n_group:
        chosen = replace(chosen, n_group=1, topk_group=1)  # unbalanced: plain top-k
    return chosen


def _combine(outs: torch.Tensor, slot: torch.Tensor, ids: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
    """sum_s w_s f_{ids_s} [n, H] (float32) from cached outputs `outs` [n, M, H]."""
    slots = slot.gather(1, ids)
    if bool((slots < 0).any()):
        raise RuntimeError("a re-routed expert output was not cached (internal error)")
    picked = outs.gather(1, slots.unsqueeze(-1).expand(-1, -1, outs.shape[-1])).float()
    return (picked * weights.unsqueeze(-1)).sum(1)


def torch_einsum(w: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """sum_{s,s'} w_s w_s' pair[s, s'] per row: [N, k], [N, k, k] -> [N]."""
    return ((w.unsqueeze(2) * pair) * w.unsqueeze(1)).sum((1, 2))


TIE_TOLERANCE = 1e-5  # relative score gap treated as a tie when choosing what to cache


def gram_fits(m: int, hidden: int) -> bool:
    """Whether D uses Gram terms for M cached outputs per token of width `hidden`: M <=
    GRAM_MAX, or the Gram [M, M] (float64) takes less memory than the outputs [M, H] (float32)
    it replaces, 2 M <= H (Qwen3-30B-A3B at 50 %: M = 72, H = 2048)."""
    return m <= GRAM_MAX or 2 * m <= hidden


def cached_candidates(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None,
                      n_drop: int) -> torch.Tensor:
    """Ids [N, M] of the experts whose outputs must be cached (see module docstring)."""
    import torch

    num, experts = logits.shape
    stable = routing.n_group <= 1 and (routing.scoring == "sigmoid" or bias is None)
    m = min(experts, routing.top_k + n_drop) if stable else experts
    if m == experts:
        return torch.arange(experts).expand(num, experts).clone()
    if routing.topk_first:
        score = logits.float()
    else:
        score = logits.float().sigmoid() if routing.scoring == "sigmoid" else logits.float()
        if bias is not None:
            score = score + bias.float().reshape(1, -1)
    # ties at the m-th score could be broken either way: exact ones (bf16 logits), and near
    # ones that the routing's softmax rounds to equal probabilities (logits a few float32 ulps
    # apart, ranked by expert id there): cache every score within TIE_TOLERANCE of it
    kth = torch.topk(score, m, dim=-1).values[:, -1:]
    m = int((score >= kth - TIE_TOLERANCE * (1 + kth.abs())).sum(-1).max())
    return torch.topk(score, m, dim=-1)[1]


def kept_candidates(logits: torch.Tensor, bias: torch.Tensor | None, routing: Routing,
                    pruned_routing: Routing, keep: list[int]) -> torch.Tensor:
    """Ids [N, 2k] of the experts token t uses unpruned and when only `keep` exist (as
    `LayerReplay.routed` routes them; an expert in both appears twice, harmlessly)."""
    import torch

    full, _ = route(logits, routing, bias, None)
    pruned, _ = route(logits, routing_among(routing, pruned_routing, keep), bias, keep)
    return torch.cat([full, pruned], dim=1)


def expert_outputs(experts: Any, inputs: torch.Tensor, cand: torch.Tensor,
                   dtype: Any = "float32") -> torch.Tensor:
    """f_e(x_t) for every (t, e = cand[t, m]) as [N, M, H] on the CPU, computed by the
    transformers experts module with weight 1 (the model's own experts implementation) on its
    own device (the candidates usually come from CPU routing, the inputs from the engine),
    EXPERT_BYTES at a time (`chunks`). `dtype`: float32, or None to keep the module's output
    dtype (its float32 upcast is the float32 result, exactly)."""
    import torch

    device = module_device(experts)
    (num, m), hidden = cand.shape, int(inputs.shape[-1])
    out = torch.empty((num, m, hidden)) if dtype == "float32" or num == 0 else None
    for start, stop in chunks(num, m * hidden, EXPERT_BYTES // 4):
        rows = inputs[start:stop].to(device).repeat_interleave(m, dim=0)
        ones = torch.ones((rows.shape[0], 1), dtype=inputs.dtype, device=device)
        with torch.no_grad():
            got = experts(rows, cand[start:stop].reshape(-1, 1).to(device), ones)
        if out is None:
            out = torch.empty((num, m, hidden), dtype=got.dtype)
        out[start:stop] = got.view(stop - start, m, hidden).cpu()
        del rows, got
    return out


def chunks(num: int, row_values: int, values: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `num` rows of `row_values` each, at most `values` a range."""
    step = max(1, values // max(row_values, 1))
    return [(s, min(num, s + step)) for s in range(0, num, step)]


def build_replay(experts: Any, inputs: torch.Tensor, logits: torch.Tensor,
                 bias: torch.Tensor | None, routing: Routing, pruned_routing: Routing,
                 n_drop: int, keep_outputs: bool = False,
                 keep: list[int] | None = None) -> LayerReplay:
    """Cache what `LayerReplay` needs for tokens `inputs` [N, H] with router `logits` [N, E]:
    chunk by chunk, the outputs f [n, M, H] give y_E and (`gram_fits`) G, c, ||y_E||^2; f
    itself is kept only without them or with `keep_outputs` (module docstring). With
    `keep` (a fixed kept set, no search) only the 2k experts each token can use are cached:
    its unpruned top-k and its top-k among `keep` (`kept_candidates`); the replay then
    answers for `keep` and the unpruned layer only."""
    import torch

    logits = logits.float().cpu()
    bias = bias.float().cpu() if bias is not None else None
    cand = cached_candidates(logits, routing, bias, n_drop) if keep is None else \
        kept_candidates(logits, bias, routing, pruned_routing, keep)
    num, m = cand.shape
    slot = torch.full(logits.shape, -1, dtype=torch.long)
    slot.scatter_(1, cand, torch.arange(m).expand_as(cand).contiguous())
    replay = LayerReplay(logits, bias, routing, pruned_routing, cand, None, slot,
                         torch.empty((num, int(inputs.shape[-1]))))
    ids, weights = replay.routed(None)
    gram = gram_fits(m, int(inputs.shape[-1]))
    if gram:
        replay.gram = torch.empty((num, m, m), dtype=torch.float64)
        replay.cross = torch.empty((num, m), dtype=torch.float64)
        replay.tnorm = torch.empty(num, dtype=torch.float64)
    row = m * int(inputs.shape[-1])
    for start, stop in chunks(num, row, EXPERT_BYTES // 4):
        outs = expert_outputs(experts, inputs[start:stop], cand[start:stop], dtype=None)
        replay.target[start:stop] = _combine(outs, slot[start:stop], ids[start:stop],
                                             weights[start:stop])
        if gram:
            for a, b in chunks(stop - start, row, CHUNK_BYTES // 8):
                wide = outs[a:b].double()
                replay.gram[start + a:start + b] = wide @ wide.transpose(1, 2)
                want = replay.target[start + a:start + b].double().unsqueeze(-1)
                replay.cross[start + a:start + b] = (wide @ want).squeeze(-1)
                replay.tnorm[start + a:start + b] = want.squeeze(-1).pow(2).sum(-1)
                del wide, want
        if keep_outputs or not gram:
            if replay.outs is None:
                replay.outs = torch.empty((num, m, outs.shape[-1]), dtype=outs.dtype)
            replay.outs[start:stop] = outs
        del outs
    trim_heap()  # the chunks' freed blocks back to the OS before the refit allocates
    return replay
