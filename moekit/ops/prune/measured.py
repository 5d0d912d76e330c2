"""Selection by measured damage, layer by layer, on an in-memory model.

For each MoE layer l in order: capture its block inputs and router logits on the calibration
sample (with every earlier layer already behaving as pruned, `override.PrunedLayers`), cache the
outputs of the experts each token can be re-routed to (`replay`), beam-search the removal set
with the lowest re-routed layer error (`search`), optionally refit the kept experts' down
projections (`compensate`, kept only where a held-out token slice says it helps), then override
layer l so the next layers see its pruned output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moekit.calib.capture import MoeBlock, capture_layers, moe_blocks
from moekit.calib.routing import Routing, selection_bias
from moekit.ops.plan import group_count, group_feasible
from moekit.ops.prune.compensate import LayerFit, refit_layer, set_down_weight
from moekit.ops.prune.override import PrunedLayers
from moekit.ops.prune.replay import build_replay
from moekit.ops.prune.search import search_drop

if TYPE_CHECKING:
    import torch

    from moekit.calib.data import DataSource
    from moekit.families.layout import ModelLayout


@dataclass
class Calibration:
    """An in-memory model with its family record, layout and token batches: `fit` for
    selection and refits, `held` (a separate slice) for scoring candidate plans."""

    model: Any
    layout: ModelLayout
    blocks: list[MoeBlock]
    routing: Routing
    fit: list[torch.Tensor]
    held: list[torch.Tensor]
    max_tokens: int
    data_hash: str = ""
    originals: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    reference: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def family(self) -> Any:
        return self.layout.family

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


def load_calibration(source: Path, layout: ModelLayout, sources: list[DataSource], *,
                     fraction: tuple[float, float], seq_len: int, max_tokens: int,
                     held_out: float = 0.2, device: str = "auto",
                     dtype: str = "auto") -> Calibration:
    """Load model and tokenizer, tokenise the data, interleave the domains' windows, keep the
    last `held_out` share of each domain's windows apart for scoring."""
    import hashlib

    from moekit.calib.data import load_domains
    from moekit.runtime.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(source)
    per_source = max(2 * seq_len, int(max_tokens / (1 - held_out) / len(sources)) + seq_len)
    domains = load_domains(sources, tokenizer, seq_len=seq_len, max_tokens=per_source,
                           fraction=fraction)
    fit, held = [], []
    for domain in domains:
        cut = max(1, int(round(len(domain.windows) * (1 - held_out))))
        fit.append(domain.windows[:cut])
        held.append(domain.windows[cut:])
    model = load_model(source, device, dtype)
    family = layout.family
    digest = hashlib.sha256("".join(d.sha256 for d in domains).encode()).hexdigest()[:16]
    return Calibration(model, layout, moe_blocks(model, family),
                       Routing.of(family, layout.config), _interleave(fit), _interleave(held),
                       max_tokens, digest)


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


def measure_layers(cal: Calibration, n_drop: int, *, beam: int = 4, compensate: bool = True,
                   protect: dict[int, list[int]] | None = None, width: int | None = None,
                   on_layer: Any = None) -> list[MeasuredLayer]:
    """Choose every layer's removal set in order (see module docstring); with `width`, also
    trim every kept expert to that many neurons (refit included, `compensate.refit_layer`).
    The model's weights are restored afterwards (refits are returned in `MeasuredLayer.fit`)."""
    protect = protect or {}
    results: list[MeasuredLayer] = []
    logits_index = cal.family.router.logits_index
    if (compensate or width is not None) and not cal.reference:
        caps = capture_layers(cal.model, cal.family, cal.fit, max_tokens=cal.max_tokens,
                              outputs=False, residual=True)
        cal.reference = {layer: cap.residual for layer, cap in caps.items()}
    with PrunedLayers() as pruned:
        try:
            for block in cal.blocks:
                start = time.perf_counter()
                result = _measure_layer(cal, block, n_drop, beam, compensate,
                                        frozenset(protect.get(block.layer, ())), width)
                result.seconds = time.perf_counter() - start
                groups = grouping(cal.layout, block.experts.num_experts, n_drop)[1]
                pruned.add(block, result.kept, cal.routing.after_prune(groups), logits_index)
                results.append(result)
                if on_layer:
                    on_layer(result)
        finally:
            restore_weights(cal)
    return results


def _measure_layer(cal: Calibration, block: MoeBlock, n_drop: int, beam: int, compensate: bool,
                   protected: frozenset[int], width: int | None) -> MeasuredLayer:
    num = int(block.experts.num_experts)
    groups, changes = grouping(cal.layout, num, n_drop)
    refit = width is not None or (compensate and n_drop > 0)
    cap = capture_layers(cal.model, cal.family, cal.fit, max_tokens=cal.max_tokens,
                         layers=[block.layer], outputs=False, residual=refit)[block.layer]
    replay = build_replay(block.experts, cap.inputs, cap.logits, selection_bias(block.block),
                          cal.routing, cal.routing.after_prune(changes), n_drop)
    found = search_drop(replay.error, num, n_drop, protected=protected, groups=groups, beam=beam)
    kept = [e for e in range(num) if e not in found.dropped]
    fit = None
    if refit:
        drift = cal.reference[block.layer] - cap.residual
        fit = refit_layer(block.layer, replay, block.experts, cap.inputs, kept, width, drift)
        apply_fit(cal, block, fit)
    return MeasuredLayer(block.layer, kept, sorted(found.dropped), found.error, found.single,
                         fit, 0.0)


def apply_fit(cal: Calibration, block: MoeBlock, fit: LayerFit) -> None:
    """Write a layer's refitted down projections into the in-memory model (originals kept)."""
    from moekit.ops.prune.compensate import down_weight

    for e, weight in fit.weights.items():
        cal.originals.setdefault((block.layer, e), down_weight(block.experts, e).clone())
        set_down_weight(block.experts, e, weight)


def restore_weights(cal: Calibration) -> None:
    """Undo every `apply_fit`."""
    for (layer, e), weight in cal.originals.items():
        set_down_weight(cal.block(layer).experts, e, weight)
    cal.originals.clear()
