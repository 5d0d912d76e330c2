"""The selection-and-scoring pass of a calibrated prune: one layered run of the engine.

The run's batch list is made of *lanes*, copies of the calibration windows that each see a
different model, all pushed through one materialised decoder layer after the other:

    original   fit windows, the unmodified model (only with refits: the reference residuals;
               not with `reference`, residuals recorded by an earlier pass, `layerfit.reference`)
    reference  held-out windows, the unmodified model: the reference next-token distributions
    <cand>     held-out windows with candidate <cand>'s pruning (stats criteria, `measured`)
    pruned     fit windows with every earlier layer pruned (and refitted) as chosen
    <cand+fit> held-out windows with the measured selection and its refits

For each MoE layer l (`on_layer`, the layer's weights in memory - the whole model, or just
this layer when streamed): `original` and `pruned` windows run through layer l once more to
capture the block input X [N, H], router logits Z [N, E] and output residuals
(`calib.capture.capture_step`); `measured.measure_layer` chooses the removal set and the refits;
the refits go to disk (`runtime.spill`) for the writer. Then the engine runs every lane's windows
through layer l; a forward hook on the experts (`override.PrunedLayers`, conditional on the lane
now running) re-routes each lane among its kept experts, and the refitted down projections (and
refitted router rows, `router_fit`) are swapped in for the refitted lanes only (they run last,
so this happens once per layer). Attention of the fit windows is computed twice per MoE layer;
every layer is read once.

Scoring (`held_out_kl`): the engine yields each held-out lane's last-layer output F [S, H]
(not its logits). The reference lane's F is kept (S x H per window, the engine's own hidden
state); for a candidate window, the reference and candidate logits are recomputed from F
through the model's own final norm and LM head, SCORE_BYTES of log-probabilities at a time, and
KL(reference || candidate) and top-1 agreement are summed. So no held-out position's
vocabulary-wide distribution outlives its chunk: memory is S x H per reference window plus
2 x rows x V, instead of 0.2 N x V floats; the price is the reference head computed once per
candidate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moekit.calib.capture import capture_step
from moekit.layerfit.measured import (
    Calibration,
    MeasuredLayer,
    apply_fit,
    grouping,
    measure_layer,
    needs_refit,
    restore_weights,
)
from moekit.layerfit.override import PrunedLayers
from moekit.layerfit.reconstruct import (
    GateUp,
    Rebuild,
    apply_rebuild,
    canonical_gate_up,
    in_memory_interleaved,
    restore_rebuild,
)
from moekit.layerfit.refit_stream import (
    fit_from_chunks,
    positions_per_chunk,
    streamed_chunks,
)
from moekit.layerfit.router_fit import RouterFit, apply_router, restore_router

ROUTER_KEY = -1  # spill key of layer l's router rows: ROUTER_KEY - l (refits use l)
REBUILD_KEY = 1 << 20  # spill key of layer l's rebuilt gate/up rows: REBUILD_KEY + l
SCORE_BYTES = 16 << 20  # one float32 [rows, V] log-probability block while scoring

if TYPE_CHECKING:
    import torch

    from moekit.runtime.spill import TensorSpill


@dataclass
class Lane:
    """One copy of the windows: `keep` {layer: kept ids} (missing: unpruned), whether it uses
    the refitted down projections (and, with `router`, the refitted router rows), and its
    batch indices in the run."""

    name: str
    held: bool
    keep: dict[int, list[int]] = field(default_factory=dict)
    refitted: bool = False
    measured: bool = False
    batches: list[int] = field(default_factory=list)
    router: bool = True


@dataclass
class Search:
    """Measured-selection settings (`n_drop` experts per layer). With `kept` {layer: ids}
    (every MoE layer's entry there by the time the run reaches it) each layer keeps exactly
    those ids: no search, `measure_layer(kept=...)` measures and refits them."""

    n_drop: int
    beam: int = 4
    compensate: bool = True
    width: int | None = None
    protect: dict[int, list[int]] = field(default_factory=dict)
    router: bool = True
    reconstruct: int = 0
    reconstruct_progress: float = 0.0  # `reconstruct.reconstruct_layer`'s `progress`
    kept: dict[int, list[int]] | None = None


@dataclass
class Scores:
    """Sums of KL(reference || lane) and top-1 agreement over held-out positions, per lane."""

    kl: dict[str, float] = field(default_factory=dict)
    agree: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def mean(self, lane: str) -> tuple[float, float]:
        count = max(self.count.get(lane, 0), 1)
        return self.kl.get(lane, 0.0) / count, self.agree.get(lane, 0.0) / count


class LaneRun:
    """State of the pass (see the module docstring); `run()` executes it."""

    def __init__(self, cal: Calibration, lanes: list[Lane], search: Search | None,
                 spill: TensorSpill | None, on_result: Callable[[MeasuredLayer], None],
                 reference: Callable[[int], torch.Tensor] | None = None):
        """`reference(layer)`: the unmodified model's residual R_l [n, H] on the `pruned`
        lane's windows (`layerfit.reference`), instead of an `original` lane's capture (not
        with the router refit, which needs the original router logits too)."""
        if reference is not None and search is not None and search.router:
            raise ValueError("the router refit needs the original lane (internal error)")
        self.cal, self.lanes, self.search, self.spill = cal, lanes, search, spill
        self.on_result, self.reference = on_result, reference
        self.results: list[MeasuredLayer] = []
        self.batches: list[torch.Tensor] = []
        self.lane_of: list[Lane] = []
        for lane in lanes:
            windows = cal.held if lane.held else cal.fit + cal.extra
            lane.batches = list(range(len(self.batches), len(self.batches) + len(windows)))
            self.batches += windows
            self.lane_of += [lane] * len(windows)
        self.blocks = {b.layer: b for b in cal.blocks}
        self.current: Lane | None = None
        self.layer: int | None = None
        self.fit: dict[int, torch.Tensor] = {}
        self.router: RouterFit | None = None
        self.rebuild: Rebuild | None = None
        self.saved: tuple[dict[int, torch.Tensor], Any] | None = None
        self.saved_rows: dict[str, dict[int, torch.Tensor]] = {}

    def lane(self, name: str) -> Lane:
        return next(lane for lane in self.lanes if lane.name == name)

    def run(self) -> Scores:
        """Run every lane through the model once; return the held-out scores."""
        n_drop = self.search.n_drop if self.search else 0
        num = self.cal.layout.moe_layers[0].num_experts
        routing = self.cal.routing.after_prune(grouping(self.cal.layout, num, n_drop)[1])
        heads = {b for lane in self.lanes if lane.held for b in lane.batches}
        scores = Scores()
        reference: dict[int, torch.Tensor] = {}
        with PrunedLayers() as pruned:
            for block in self.cal.blocks:
                pruned.add(block, lambda layer=block.layer: self.keep(layer), routing,
                           self.cal.family.router.logits_index)
            for index, final in self.cal.engine.run(
                    self.batches, before=self.before, head=heads, on_layer=self.on_layer,
                    after_layer=self.after_layer, final=True):
                if final is not None:
                    self._score(index, final, reference, scores)
        return scores

    def keep(self, layer: int) -> list[int] | None:
        return self.current.keep.get(layer) if self.current is not None else None

    def before(self, index: int) -> None:
        """Batch `index` is about to run: its lane's pruning (and refits) apply."""
        self.current = lane = self.lane_of[index]
        if self.layer is None or self.layer not in self.blocks:
            return
        block = self.blocks[self.layer]
        if not lane.refitted:
            self._restore(block)
            return
        if self.saved is None and (self.fit or self.router):
            self.saved = (apply_fit(block, self.fit), None)
            self.saved_rows = apply_rebuild(block.experts, self.rebuild)
        if self.saved is not None and lane.router != (self.saved[1] is not None):
            router = apply_router(block.router, self.router) if lane.router else None
            if not lane.router:
                restore_router(block.router, self.saved[1])
            self.saved = (self.saved[0], router)

    def on_layer(self, step: Any) -> None:
        self.layer = step.index
        block = self.blocks.get(step.index)
        if block is None or self.search is None:
            return
        start = time.perf_counter()
        search, cal = self.search, self.cal
        refit = needs_refit(search.n_drop, search.compensate, search.width)
        reference = ref_logits = None
        if refit and self.reference is None:
            original = self._capture(step, block, "original", residual=True)
            reference, ref_logits = original.residual, original.logits
            del original
        cap = self._capture(step, block, "pruned", residual=refit)
        if refit and self.reference is not None:  # whole windows; the capture stops at max_tokens
            reference = self.reference(block.layer)[:cap.residual.shape[0]].to(cap.residual.device)
        result = measure_layer(cal, block, cap, search.n_drop, beam=search.beam,
                               compensate=search.compensate, width=search.width,
                               protected=frozenset(search.protect.get(block.layer, ())),
                               reference=reference, router=search.router,
                               reference_logits=ref_logits,
                               refit=self._streamed(step, block) if refit and cal.streams_refit
                               else None, reconstruct=search.reconstruct,
                               reconstruct_progress=search.reconstruct_progress,
                               kept=None if search.kept is None else search.kept[block.layer])
        del cap, reference, ref_logits
        result.seconds = time.perf_counter() - start
        for lane in self.lanes:
            if lane.measured:
                lane.keep[block.layer] = result.kept
        if result.fit is not None and result.fit.weights:
            self.fit = result.fit.weights
            if self.spill is not None:
                self.spill.put(block.layer, {str(e): w for e, w in self.fit.items()})
                result.fit.weights = self.spill.layer(block.layer)  # lazy: read when written
        if result.rebuild is not None:
            self._keep_rebuild(block, result)
        if result.router is not None and result.router.changed:
            self.router = RouterFit(block.layer, *result.router.tensors(), alpha=0.0)
            if self.spill is not None:
                result.router.spill_to(self.spill, ROUTER_KEY - block.layer)
        self.results.append(result)
        self.on_result(result)

    def after_layer(self, step: Any) -> None:
        if self.saved is not None:
            self._restore(self.blocks[step.index])
        self.saved, self.fit, self.router, self.layer = None, {}, None, None
        if self.rebuild is not None:
            self.rebuild.rows.clear()  # spilled; the result keeps its errors
        self.rebuild = None

    def _restore(self, block: Any) -> None:
        if self.saved is not None:
            restore_rebuild(block.experts, self.saved_rows)
            restore_weights(block, self.saved[0])
            restore_router(block.router, self.saved[1])
        self.saved, self.saved_rows = None, {}

    def _keep_rebuild(self, block: Any, result: MeasuredLayer) -> None:
        """The rebuilt gate/up rows stay in memory for this layer's lanes; their canonical
        (gate, up) go to the spill for the writer (`result.gate_up`, read when written)."""
        rebuild = self.rebuild = result.rebuild
        assert rebuild is not None
        rows = rebuild.rows["gate_up_proj"]
        pairs = canonical_gate_up(block.experts, rows, in_memory_interleaved(self.cal.layout))
        change = {}
        for e, row in rows.items():
            old = block.experts.gate_up_proj[e].detach().float().cpu()
            change[e] = float((row - old).norm() / old.norm().clamp(min=1e-30))
        if self.spill is None:
            result.gate_up = {e: GateUp(lambda p=p: p, change[e]) for e, p in pairs.items()}
            return
        key, spill = REBUILD_KEY + block.layer, self.spill
        spill.put(key, {f"{e}.{r}": t for e, (g, u) in pairs.items()
                        for r, t in (("g", g), ("u", u))})
        result.gate_up = {e: GateUp(lambda e=e: (spill.read(key, f"{e}.g"),
                                                 spill.read(key, f"{e}.u")), change[e])
                          for e in pairs}

    def _streamed(self, step: Any, block: Any) -> Callable[[Any, list[int]], Any]:
        """The down refit on `cal.refit_tokens` positions streamed through the layer
        (`refit_stream`), as `measure_layer`'s `refit`."""
        original, pruned = self.lane("original").batches, self.lane("pruned").batches
        sizes = [int(self.batches[b].numel()) for b in pruned]

        def capture(batches: list[int], max_tokens: int, residual: bool) -> Any:
            return capture_step(step, block, batches, max_tokens=max_tokens, residual=residual,
                                logits_index=self.cal.family.router.logits_index,
                                select=self.before)

        def refit(replay: Any, kept: list[int]) -> Any:
            experts = block.experts
            inner = int(experts.down_proj.shape[1 if getattr(experts, "is_transposed", False)
                                                else 2])
            per = positions_per_chunk(int(replay.target.shape[1]), replay.num_experts,
                                      int(replay.routed(kept)[0].shape[1]), inner)
            chunks = streamed_chunks(capture, original, pruned, sizes, self.cal.refit_tokens,
                                     per)
            return fit_from_chunks(block.layer, experts, replay, kept, chunks,
                                   self.cal.refit_tokens,
                                   keep_sample=bool(self.search and self.search.reconstruct))

        return refit

    def _capture(self, step: Any, block: Any, lane: str, residual: bool) -> Any:
        return capture_step(step, block, self.lane(lane).batches,
                            max_tokens=self.cal.max_tokens, residual=residual,
                            logits_index=self.cal.family.router.logits_index,
                            select=self.before)

    def _score(self, index: int, final: torch.Tensor, reference: dict[int, torch.Tensor],
               scores: Scores) -> None:
        """Reference lane first: keep its last-layer outputs; every other held-out lane adds
        its `held_out_kl` sums against the reference window at the same position."""
        lane = self.lane_of[index]
        if lane.name == "reference":
            reference[lane.batches.index(index)] = final
            return
        slot = lane.batches.index(index)
        kl, agree, count = held_out_kl(self.cal.engine, self.batches[index], reference[slot],
                                       final)
        scores.kl[lane.name] = scores.kl.get(lane.name, 0.0) + kl
        scores.agree[lane.name] = scores.agree.get(lane.name, 0.0) + agree
        scores.count[lane.name] = scores.count.get(lane.name, 0) + count


def held_out_kl(engine: Any, ids: torch.Tensor, ref_final: torch.Tensor, final: torch.Tensor,
                rows: int | None = None) -> tuple[float, float, int]:
    """(sum_t KL(p_ref,t || p_t), sum_t [argmax p_ref,t = argmax p_t], count) over the
    next-token positions t < S - 1 of the windows `ids` [B, S], where p_ref and p are the
    model's distributions from the last-layer outputs `ref_final` and `final` [B, S, H]
    (`Engine.logits`), KL = sum_v p_ref (log p_ref - log p), computed in float32 `rows`
    positions at a time (default: SCORE_BYTES of log-probabilities)."""
    import torch

    batch, seq = int(ids.shape[0]), int(ids.shape[-1])
    vocab = int(engine.model.get_output_embeddings().weight.shape[0])
    step = rows or max(8, SCORE_BYTES // (4 * vocab * batch))
    kl = agree = 0.0
    for start in range(0, seq - 1, step):
        keep = torch.arange(start, min(seq - 1, start + step))
        ref = torch.log_softmax(engine.logits(ids, ref_final, keep).float(), dim=-1)
        logp = torch.log_softmax(engine.logits(ids, final, keep).float(), dim=-1)
        kl += float((ref.exp() * (ref - logp)).sum())
        agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        del ref, logp
    return kl, agree, batch * max(seq - 1, 0)
