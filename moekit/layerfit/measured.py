"""Selection by measured damage, one MoE layer at a time, on captures of that layer.

For each MoE layer l in order (driven by the layer-streaming passes, `lanes`): the layer's
block inputs and router logits on the calibration sample, with every earlier layer already
behaving as pruned, are captured; the outputs of the experts each token can be re-routed to are
cached (`replay`); the removal set with the lowest re-routed layer error is beam-searched
(`search`); optionally the kept experts' down projections are refitted (`compensate`, kept only
where a held-out token slice says it helps); then layer l is overridden so the next layers see
its pruned output. `load_calibration` opens the model through `moekit.runtime` (in memory or
streamed under `max_memory`) and tokenises the calibration data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import moekit.calib.data
import moekit.runtime.engine
from moekit.calib.capture import LayerCapture, MoeBlock, moe_blocks
from moekit.calib.routing import Routing, selection_bias
from moekit.calib.spec import DataSpec
from moekit.layerfit.compensate import LayerFit, down_weight, refit_layer, set_down_weight
from moekit.layerfit.incremental import IncrementalError, local_routing
from moekit.layerfit.reconstruct import Rebuild, apply_rebuild, reconstruct_layer, restore_rebuild
from moekit.layerfit.replay import build_replay
from moekit.layerfit.router_fit import RouterFit, refit_router
from moekit.layerfit.search import SearchResult, search_drop
from moekit.runtime.loading import load_tokenizer
from moekit.runtime.options import RunOptions
from moekit.surgery.plan import group_count, group_feasible

if TYPE_CHECKING:
    import torch

    from moekit.families.layout import ModelLayout
    from moekit.layerfit.replay import LayerReplay


@dataclass
class Calibration:
    """The model in `moekit.runtime` (`engine`: in memory or streamed) with its family record,
    layout and token windows ([1, S] each): `fit` for selection and refits (only as many as
    `max_tokens` positions need), `held` (a separate slice) for scoring candidate plans."""

    engine: Any
    layout: ModelLayout
    blocks: list[MoeBlock]
    routing: Routing
    fit: list[torch.Tensor]
    held: list[torch.Tensor]
    max_tokens: int
    data_hash: str = ""
    domains: list[Any] = field(default_factory=list)  # the tokenised sources (calib.data.Domain)
    extra: list[torch.Tensor] = field(default_factory=list)  # more windows for the refit only
    refit_tokens: int = 0  # positions the refit streams (`refit_stream`); 0: the selection's

    @property
    def streams_refit(self) -> bool:
        return self.refit_tokens > self.max_tokens

    @property
    def family(self) -> Any:
        return self.layout.family

    @property
    def model(self) -> Any:
        return self.engine.model

    def block(self, layer: int) -> MoeBlock:
        return next(b for b in self.blocks if b.layer == layer)


@dataclass
class MeasuredLayer:
    """What the search found for one layer (errors are D(K), mean squared output change)."""

    layer: int
    kept: list[int]
    dropped: list[int]
    error: float
    single: tuple[float, ...]
    fit: LayerFit | None
    seconds: float
    router: RouterFit | None = None
    rebuild: Rebuild | None = None
    gate_up: dict[int, Any] = field(default_factory=dict)  # {expert: GateUp}, for the writer


def load_calibration(source: Path, layout: ModelLayout, data: DataSpec, *, max_tokens: int,
                     held_out: float = 0.2, run: RunOptions = RunOptions(),
                     stream: bool | None = None, hidden_ram: int | None = None, spread: int = 1,
                     refit_tokens: int | None = None) -> Calibration:
    """Open the model as `run` says (`runtime.engine.open_model`: memory or streamed by the
    budget; `stream` forces it), tokenise `data` (`calib.spec.DataSpec`: its sources, range,
    text field, tokenizer and windows of `data.seq_len`), interleave the domains' windows, keep
    the last `held_out` share of each domain's windows apart for scoring. `max_tokens` positions
    are fitted on. Each source gives `data.max_tokens // len(sources)` tokens (the CLI's
    `--max-tokens`: read in total, fitted and held out, `max_tokens` =
    `fit_tokens(data.max_tokens, held_out)`); with `data.max_tokens` None, as many as hold its
    share of `max_tokens` after the held-out one, plus a window (at least two windows).

    With `spread` > 1, up to `spread` times the needed tokens of each source are read and the
    windows used are spaced evenly over them (`spread_windows`), so that a small sample covers
    many documents of the range instead of its first few.

    With `refit_tokens` > `max_tokens`, each source is read further: the windows after those
    the selection and scoring use become `extra` (interleaved, up to `refit_tokens` positions
    with the selection's), which only the streamed refit sees (`refit_stream`)."""
    import hashlib

    sources, seq_len, read = list(data.sources), data.seq_len, data.max_tokens
    tok = load_tokenizer(source, data.tokenizer, run.trust_remote_code)
    per_source = max(2 * seq_len, int(max_tokens / (1 - held_out) / len(sources)) + seq_len) \
        if read is None else read // len(sources)
    more = max(0, (refit_tokens or 0) - max_tokens)
    more_per_source = -(-more // len(sources)) + seq_len if more else 0
    domains = moekit.calib.data.load_domains(sources, tok, seq_len=seq_len,
                                             max_tokens=per_source * spread + more_per_source,
                                             fraction=data.fraction,
                                             text_field=data.text_field)
    fit, held, extra = [], [], []
    for domain in domains:
        first = -(-per_source * spread // seq_len) if more else len(domain.windows)
        windows = spread_windows(domain.windows[:first], -(-per_source // seq_len))
        cut = max(1, int(round(len(windows) * (1 - held_out))))
        if held_out > 0 and len(windows) > 1:
            cut = min(cut, len(windows) - 1)  # every domain with 2+ windows scores too
        fit.append(windows[:cut])
        held.append(windows[cut:])
        extra.append(domain.windows[first:])
    engine = moekit.runtime.engine.open_model(source, **run.engine(), stream=stream,
                                              hidden_ram=hidden_ram)
    family = layout.family
    digest = hashlib.sha256("".join(d.sha256 for d in domains).encode()).hexdigest()[:16]
    fit_windows = _needed(_interleave(fit), max_tokens)
    seen = sum(int(w.numel()) for w in fit_windows)
    extra_windows = _needed(_interleave(extra), more - (seen - max_tokens)) if more else []
    return Calibration(engine, layout, moe_blocks(engine.model, family),
                       Routing.of(family, layout.config), fit_windows, _interleave(held),
                       max_tokens, digest, domains, extra_windows,
                       seen + sum(int(w.numel()) for w in extra_windows) if more else 0)


def fit_tokens(total: int, held_out: float) -> int:
    """The positions fitted on when `total` tokens are read in total (`--max-tokens`), the
    `held_out` share of them kept apart: floor(total x (1 - held_out))."""
    return math.floor(total * (1 - held_out) + 1e-9)


def default_read(fit: int, held_out: float, seq_len: int, sources: int) -> int:
    """The tokens `load_calibration` reads in total without `data.max_tokens`: per source
    max(2 seq_len, int(fit / (1 - held_out) / sources) + seq_len)."""
    return sources * max(2 * seq_len, int(fit / (1 - held_out) / sources) + seq_len)


def spread_windows(windows: list[torch.Tensor], need: int) -> list[torch.Tensor]:
    """`need` windows spaced evenly over `windows`, in order: window int((i + 1/2) * n / need)
    for i < need (all of them when there are at most `need`)."""
    if len(windows) <= need:
        return list(windows)
    step = len(windows) / need
    return [windows[int((i + 0.5) * step)] for i in range(need)]


def _needed(windows: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    """The leading windows that hold the first `max_tokens` positions (the rest is unused)."""
    out, seen = [], 0
    for window in windows:
        if seen >= max_tokens:
            break
        out.append(window)
        seen += int(window.numel())
    return out


def _interleave(per_domain: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Round-robin one window of each domain at a time, as [1, S] batches."""
    out = []
    for i in range(max((len(w) for w in per_domain), default=0)):
        out += [w[i].unsqueeze(0) for w in per_domain if i < len(w)]
    return out


def grouping(layout: ModelLayout, num_experts: int, n_drop: int) -> tuple[int, dict[str, int]]:
    """(groups to drop equally from, config changes) so that the plan's routing is valid."""
    groups = group_count(layout)
    if groups <= 1 or n_drop == 0:
        return 1, {}
    size = num_experts // groups
    if num_experts % groups == 0 and n_drop % groups == 0 and group_feasible(
            layout, size - n_drop // groups):
        return groups, {}
    return 1, {"n_group": 1, "topk_group": 1}


def measure_layer(cal: Calibration, block: MoeBlock, cap: LayerCapture, n_drop: int, *,
                  beam: int, compensate: bool, protected: frozenset[int], width: int | None,
                  reference: torch.Tensor | None, router: bool = False,
                  reference_logits: torch.Tensor | None = None,
                  refit: Callable[[LayerReplay, list[int]], LayerFit] | None = None,
                  reconstruct: int = 0,
                  reconstruct_progress: float = 0.0,
                  kept: list[int] | None = None) -> MeasuredLayer:
    """Search (and refit) one layer whose weights are materialised, from its capture `cap`
    (inputs, logits; with a refit also the layer's output residual) and `reference`, the
    unmodified model's residual at the same positions [N, H] (the refit absorbs the drift) and
    `reference_logits` its router logits there [N, E]. With `router` (expert pruning with
    compensation), the kept router rows are refitted after the down projections
    (`router_fit`). `refit(replay, kept)`, when given, replaces the down refit on the capture
    (the streamed refit on more tokens, `refit_stream`; not with `width`). With `reconstruct`
    > 0 the kept experts are then fitted whole for at most that many steps (`reconstruct`),
    stopped early at `reconstruct_progress` (`reconstruct_layer`'s `progress`).

    With `kept` (the ids to keep, `num_experts - n_drop` of them; merge's centres) there is no
    search: the layer is measured and refitted keeping exactly those (`error` is D(kept),
    `single` is empty)."""
    num = int(block.experts.num_experts)
    groups, changes = grouping(cal.layout, num, n_drop)
    replay = build_replay(block.experts, cap.inputs, cap.logits, selection_bias(block.block),
                          cal.routing, cal.routing.after_prune(changes), n_drop, keep=kept)
    if kept is not None:
        found = fixed_drop(replay, num, n_drop, kept)
    else:
        local = groups == 1 and local_routing(replay)  # its states are freed before the refit
        found = search_drop(replay.error, num, n_drop, protected=protected, groups=groups,
                            beam=beam, extend=IncrementalError(replay).extend if local else None)
    kept = [e for e in range(num) if e not in found.dropped]
    fit = rfit = rebuild = None
    if needs_refit(n_drop, compensate, width):
        if reference is None or cap.residual is None:
            raise RuntimeError("a refit needs the layer's residuals (internal error)")
        drift = reference - cap.residual
        fit = refit(replay, kept) if refit is not None and width is None else \
            refit_layer(block.layer, replay, block.experts, cap.inputs, kept, width, drift)
        if reconstruct > 0 and width is None:
            rebuild = _reconstruct(block, replay, cap.inputs, kept, drift, fit, reconstruct,
                                   reconstruct_progress)
        if router and width is None:
            saved = apply_fit(block, fit.weights)
            rows = apply_rebuild(block.experts, rebuild)
            try:
                rfit = refit_router(block.layer, replay, block.experts, block.router,
                                    cap.inputs, kept, replay.target + drift.float().cpu(),
                                    reference_logits)
            finally:
                restore_rebuild(block.experts, rows)
                restore_weights(block, saved)
    return MeasuredLayer(block.layer, kept, sorted(found.dropped), found.error, found.single,
                         fit, 0.0, rfit, rebuild)


def fixed_drop(replay: LayerReplay, num: int, n_drop: int, kept: list[int]) -> SearchResult:
    """The removal set that keeps exactly `kept` (no search), with its error D(kept)."""
    ids = sorted(set(kept))
    if len(ids) != len(kept) or len(ids) != num - n_drop or not all(0 <= e < num for e in ids):
        raise ValueError(f"kept {kept}: expected {num - n_drop} distinct ids below {num}")
    return SearchResult(tuple(e for e in range(num) if e not in ids), replay.error(ids), ())


def _reconstruct(block: MoeBlock, replay: LayerReplay, inputs: torch.Tensor, kept: list[int],
                 drift: torch.Tensor, fit: LayerFit, steps: int,
                 progress: float = 0.0) -> Rebuild | None:
    """Fit the kept experts whole, starting from the down refit, on the streamed refit's
    positions when there are (`fit.sample`), else the selection's; when it helps on the held-out
    tokens, its down rows replace the refit's in `fit` (weights, relative changes)."""
    saved = apply_fit(block, fit.weights)
    try:
        if fit.sample is not None:  # the streamed refit's positions (`--refit-tokens`)
            inputs, ids, gates, target = fit.sample
            fit.sample = None
        else:
            ids, gates = replay.routed(kept)
            target = replay.target + drift.float().cpu()
        rebuild = reconstruct_layer(block.layer, block.experts, inputs, ids, gates, target,
                                    kept, steps, progress=progress)
    finally:
        restore_weights(block, saved)
    if not rebuild.changed:
        return None
    transposed = bool(getattr(block.experts, "is_transposed", False))
    for e, row in rebuild.rows.pop("down_proj").items():
        weight, base = (row.T if transposed else row).contiguous(), down_weight(block.experts, e)
        fit.weights[e] = weight
        fit.rel_change[e] = float((weight - base).norm() / base.norm().clamp(min=1e-30))
    return rebuild


def needs_refit(n_drop: int, compensate: bool, width: int | None) -> bool:
    return width is not None or (compensate and n_drop > 0)


def apply_fit(block: MoeBlock, weights: Any) -> dict[int, torch.Tensor]:
    """Write refitted down projections {expert: W [H, I]} into the materialised layer;
    returns the originals for `restore_weights`."""
    originals = {}
    for e, weight in weights.items():
        originals[e] = down_weight(block.experts, e).clone()
        set_down_weight(block.experts, e, weight)
    return originals


def restore_weights(block: MoeBlock, originals: dict[int, torch.Tensor]) -> None:
    """Undo an `apply_fit`."""
    for e, weight in originals.items():
        set_down_weight(block.experts, e, weight)
