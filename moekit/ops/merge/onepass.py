"""Data-driven grouping and `--method fit-layer` from one tokenisation and one layered run.

Grouping by data (`m-smoe`: router-logit columns, `hc-smoe`: mean expert outputs) needs the
unmodified model's activations on the calibration sample; the fit-layer refit (`refit.py`) runs
the model layer by layer anyway. Here the two share everything but their token positions:

- the sources are tokenised once, at the refit's budget (`layerfit.measured.load_calibration`).
  The grouping sample is the first D_tok = max_tokens // D token ids of each of the D domains:
  `calib.data.load_domains` stops at its budget, so these are exactly the ids a tokenisation at
  D_tok gives (what `calib.capture_calibration` uses), cut into the same [B, S] batches;
- those batches ride along the refit's lanes (`lanes.LaneRun`) as one more lane through the
  unmodified model (`SharedRun`). As decoder layer l starts, its MoE block input X [N, H] and
  router logits Z [N, E] on them are captured (the layer run up to its router), layer l is
  clustered (`grouping.Grouper`, layers in order as before) and its centres go to the refit of
  layer l, which follows in the same step.

Same token ids, same batch shapes, same layer weights in the same engine: the activations, so the
clusters, the refitted weights and the provenance are those of the two-pass path
(`run.Calibration(one_pass=False)`: capture, group, then `refit_merged`) bit for bit, less one
model load, one tokenisation and the spilled activations of every layer. The run itself is
`run.group_and_refit`; this module holds its pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from moekit.calib.capture import LayerCapture, capture_step
from moekit.layerfit.lanes import Lane, LaneRun
from moekit.ops.merge.refit import check_refit_grouping
from moekit.surgery.plan import grouping_changes

if TYPE_CHECKING:
    import torch

    from moekit.calib.capture import LayerCapture, MoeBlock
    from moekit.ops.merge.plan import MergeLayer
    from moekit.ops.merge.refit import LayerRefits

BeforeLayer = Callable[[Any, list[int], Callable[[int], None]], None]


@dataclass
class OnePass:
    """What the shared run gave: the clusters of every MoE layer, the refit, the grouping
    sample's size N (`tokens`) and what the engine ran (`runtime`)."""

    layers: list[MergeLayer]
    refits: LayerRefits
    tokens: int
    runtime: dict[str, Any]

    @property
    def clusters(self) -> list[list[list[int]]]:
        return [p.clusters for p in self.layers]


class SharedRun(LaneRun):
    """A `LaneRun` with one more lane, `extra` batches through the unmodified model (never
    scored or pruned), and `before_layer(step, their batch indices, select)` called as each
    decoder layer starts, before the layer's own captures and refit."""

    def __init__(self, cal: Any, lanes: list[Lane], search: Any, spill: Any,
                 on_result: Callable[[Any], None], *, extra: list[torch.Tensor],
                 before_layer: BeforeLayer):
        super().__init__(cal, lanes, search, spill, on_result)
        lane = Lane("extra", held=False)
        lane.batches = list(range(len(self.batches), len(self.batches) + len(extra)))
        self.batches += extra
        self.lane_of += [lane] * len(extra)
        self.lanes.append(lane)
        self.before_layer = before_layer

    def on_layer(self, step: Any) -> None:
        self.before_layer(step, self.lane("extra").batches, self.before)
        super().on_layer(step)


def prefixes(domains: list[Any], per_domain: int, seq_len: int) -> list[Any]:
    """Each domain (`calib.data.Domain`) cut to its first `per_domain` token ids, in windows
    of `seq_len` (windows under 2 tokens dropped, as `load_domains` does)."""
    import torch

    out = []
    for domain in domains:
        ids = torch.cat(domain.windows)[:per_domain]
        out.append(replace(domain, windows=[w for w in ids.split(seq_len) if w.numel() >= 2]))
    return out


def capture_sample(step: Any, block: MoeBlock, batches: Any, select: Callable[[int], None],
                   logits_index: int) -> LayerCapture:
    """X and Z of `block` on the first `take` positions of each (batch index, take) pair,
    the layer run up to its router (`calib.capture.capture_step`)."""
    import torch

    caps = [capture_step(step, block, [b], max_tokens=take, logits_index=logits_index,
                         select=select) for b, take in batches]
    return LayerCapture(block.layer, torch.cat([c.inputs for c in caps]),
                        torch.cat([c.logits for c in caps]))


def check_layers(layout: Any, layers: list[MergeLayer], n_drop: int) -> None:
    """The clusters so far keep the routing groups as the refit routes them (the two-pass
    path checks the whole plan before its refit: `refit.check_refit_grouping`)."""
    changes = grouping_changes(layout, [p.as_layer_plan() for p in layers])[0]
    check_refit_grouping(layout, layers[0].num_experts, n_drop, changes)
