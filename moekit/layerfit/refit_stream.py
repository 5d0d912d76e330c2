"""Streaming the refit's tokens through one materialised MoE layer (`prune --refit-tokens`).

After the selection of layer l (on the first `max_tokens` positions), the refit's positions -
the selection's and the extra calibration windows after them (`measured.load_calibration`) - run
through layer l in chunks of about REFIT_BYTES: the unmodified model's lane gives the reference
residual, the pruned lane the block input X, router logits Z and its own residual (layer l still
unpruned, as in the selection's capture). Per chunk the target y_E(X) + drift, the re-routed
gates a among the kept experts, their intermediate activations h and the residual R at the
original weights are computed (`chunk_terms`) and reduced to the sums of `refit_stats`; the last
HELD_OUT share of the positions goes to the held-out sums that choose alpha. Only one chunk's
captures exist at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from moekit.calib.routing import route
from moekit.layerfit.compensate import HELD_OUT, LayerFit, down_bias, down_weight, expert_hidden
from moekit.layerfit.refit_stats import RefitStats, allowed_pairs, refit_from_stats
from moekit.layerfit.replay import expert_outputs

if TYPE_CHECKING:
    import torch

    from moekit.layerfit.replay import LayerReplay

REFIT_BYTES = 64 << 20  # float32 per-position working set of one streamed chunk


def chunk_terms(experts: Any, replay: LayerReplay, keep: list[int], inputs: torch.Tensor,
                logits: torch.Tensor, shift: torch.Tensor | None,
                base: dict[int, torch.Tensor], bias: dict[int, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [n, k], gates [n, k], h [n, k, I], R [n, H]) for block inputs [n, H] and router
    logits [n, E]: R = y_E + shift - sum_s a_s (W_s^0 h_s + b_s), y_E the unpruned routed output
    (the family's experts module, as `replay.build_replay`)."""
    _, ids, gates, target = sample_terms(experts, replay, keep, inputs, logits, shift)
    return residual_terms(experts, inputs, ids, gates, target, base, bias)


def residual_terms(experts: Any, inputs: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor,
                   target: torch.Tensor, base: dict[int, torch.Tensor],
                   bias: dict[int, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunk_terms` from the routing and target of `sample_terms` (`target` becomes R)."""
    num, k = ids.shape
    hid = expert_hidden(experts, inputs.repeat_interleave(k, dim=0), ids.reshape(-1, 1))
    hid = hid.view(num, k, -1)
    for e in ids.unique().tolist():  # target - y'_0
        tok, slot = (ids == e).nonzero(as_tuple=True)
        own = hid[tok, slot] @ base[e].T + bias[e]
        target.index_add_(0, tok, -gates[tok, slot].unsqueeze(1) * own)
    return ids, gates, hid, target


def fit_from_chunks(layer: int, experts: Any, replay: LayerReplay, keep: list[int],
                    chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                    tokens: int, keep_sample: bool = False) -> LayerFit:
    """The refit (`refit_stats.refit_from_stats`) from `chunks` of (inputs [n, H], logits
    [n, E], shift [n, H] or None) holding `tokens` positions in all, the first
    (1 - HELD_OUT) of them fitting, the rest held out. With `keep_sample`, every chunk's
    `sample_terms` are kept too (`LayerFit.sample`) for the reconstruction."""
    hidden = int(replay.target.shape[1])
    base = {e: down_weight(experts, e) for e in keep}
    bias = {e: down_bias(experts, e, hidden) for e in keep}
    allowed = allowed_pairs(replay.routed(keep)[0], keep, int(base[keep[0]].shape[1]))
    fit, held = RefitStats(keep, allowed), RefitStats(keep, allowed)
    cut, seen = int(tokens * (1 - HELD_OUT)), 0
    kept_terms: list[tuple[torch.Tensor, ...]] = []
    for inputs, logits, shift in chunks:
        terms = sample_terms(experts, replay, keep, inputs, logits, shift)
        if keep_sample:
            kept_terms.append((*terms[:3], terms[3].clone()))
        ids, gates, hid, resid = residual_terms(experts, inputs, *terms[1:], base, bias)
        m = min(max(cut - seen, 0), int(ids.shape[0]))
        if m:
            fit.add(ids[:m], gates[:m], hid[:m], resid[:m])
        if m < ids.shape[0]:
            held.add(ids[m:], gates[m:], hid[m:], resid[m:])
        seen += int(ids.shape[0])
    out = refit_from_stats(layer, fit, held, base)
    if kept_terms:
        import torch

        out.sample = tuple(torch.cat(parts) for parts in zip(*kept_terms, strict=True))
    return out


def sample_terms(experts: Any, replay: LayerReplay, keep: list[int], inputs: torch.Tensor,
                 logits: torch.Tensor, shift: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [n, H], ids [n, k], gates [n, k], target y_E + shift [n, H]) of one chunk, the
    data of the whole-expert reconstruction (`reconstruct`)."""
    logits = logits.float().cpu()
    ids0, gates0 = route(logits, replay.routing_for(None), replay.bias, None)
    target = (expert_outputs(experts, inputs, ids0) * gates0.unsqueeze(-1)).sum(1)
    if shift is not None:
        target += shift.float().cpu()
    ids, gates = route(logits, replay.routing_for(keep), replay.bias, keep)
    return inputs.float().cpu(), ids, gates, target


def window_groups(sizes: Sequence[int], per_chunk: int) -> list[list[int]]:
    """Consecutive window indices grouped so that each group holds >= `per_chunk` positions
    (the last one fewer)."""
    groups: list[list[int]] = [[]]
    held = 0
    for i, size in enumerate(sizes):
        if held >= per_chunk:
            groups.append([])
            held = 0
        groups[-1].append(i)
        held += size
    return [g for g in groups if g]


def positions_per_chunk(hidden: int, experts: int, top_k: int, inner: int) -> int:
    """Positions of one chunk: REFIT_BYTES over the float32 values each needs (inputs, two
    residuals, target, R, logits, gates, h, and one expert output row per routed pair)."""
    return max(1, REFIT_BYTES // (4 * (5 * hidden + experts + top_k * (inner + hidden + 2))))


def streamed_chunks(capture: Callable[[list[int], int, bool], Any], original: list[int],
                    pruned: list[int], sizes: Sequence[int], tokens: int, per_chunk: int
                    ) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(inputs, logits, drift) of the pruned lane's windows `pruned`, chunk by chunk, until
    `tokens` positions; `capture(batches, max_tokens, residual)` runs batches through the layer
    (`capture.capture_step`), drift = reference residual (lane `original`) - pruned residual."""
    seen = 0
    for group in window_groups(sizes, per_chunk):
        if seen >= tokens:
            break
        ref = capture([original[i] for i in group], tokens - seen, True)
        cap = capture([pruned[i] for i in group], tokens - seen, True)
        seen += cap.num_tokens
        yield cap.inputs, cap.logits, ref.residual - cap.residual
        del ref, cap
