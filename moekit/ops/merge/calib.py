"""Calibration activations for data-driven grouping and output fitting, behind one function.

`capture_calibration` runs the model on a bounded token sample through `moekit.runtime` (in
memory, or streamed one layer at a time under `max_memory`): while each MoE layer is
materialised, hooks from `moekit.calib.capture` record its block inputs X [N, H] and router
logits Z [N, E]; when every batch went through, the logits become the model's own top-k ids and
gate weights (the family's routing function) and the layer's record goes to a temporary file
(`runtime.spill`). `CapturedLayers[layer]` reads one layer back, so grouping and fitting hold
one layer's activations at a time. The activations are those of the unmodified model (as
HC-SMoE and M-SMoE calibrate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import moekit.calib.data
import moekit.runtime.engine
from moekit.calib.capture import grab_block, grabbed, moe_blocks
from moekit.calib.data import batches
from moekit.calib.routing import Routing
from moekit.calib.routing import route as replay
from moekit.errors import UnsupportedModelError
from moekit.io.reader import Checkpoint
from moekit.runtime.engine import mode_line
from moekit.runtime.groups import require_whole_layers
from moekit.runtime.loading import load_tokenizer
from moekit.runtime.spill import TensorSpill

if TYPE_CHECKING:
    import torch

    from moekit.calib.data import DataSource
    from moekit.families.layout import ModelLayout


@dataclass
class LayerCalib:
    """One MoE layer on N calibration tokens: inputs [N, H], router logits [N, E] (float32),
    the original top-k ids [N, k] and gate weights [N, k]."""

    layer: int
    inputs: torch.Tensor
    logits: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor

    def gates(self, members: list[int]) -> torch.Tensor:
        """[N, m]: token t's gate weight on each member (0 when not among its top-k)."""
        import torch

        return torch.stack([(self.weights * (self.ids == j)).sum(dim=1) for j in members], 1)

    def split(self, start: int, stop: int) -> LayerCalib:
        """Tokens [start, stop) only (held-out checks)."""
        return LayerCalib(self.layer, self.inputs[start:stop], self.logits[start:stop],
                          self.ids[start:stop], self.weights[start:stop])


def layer_record(source: Path, layout: ModelLayout, cap: Any) -> dict[str, torch.Tensor]:
    """A captured layer (`calib.capture.LayerCapture`) as LayerCalib fields: X and Z as float32,
    the model's own top-k ids and gate weights (the family's routing, with its selection bias)."""
    logits = cap.logits.float()
    ids, weights = route(layout, logits, selection_bias(source, layout, cap.layer))
    return {"inputs": cap.inputs.float(), "logits": logits, "ids": ids,
            "weights": weights.float()}


class CapturedLayers:
    """The spilled LayerCalib of every MoE layer: `captured[layer]` reads one back (the last
    one read stays cached); `tokens` is N, `runtime` what the engine ran."""

    def __init__(self, spill: Any, layers: list[int], tokens: int, runtime: dict[str, Any]):
        self.spill, self.layers, self.tokens, self.runtime = spill, layers, tokens, runtime
        self._last: LayerCalib | None = None

    def get(self, layer: int) -> LayerCalib | None:
        if layer not in self.layers:
            return None
        if self._last is None or self._last.layer != layer:
            self._last = None  # free the previous layer before reading the next
            self._last = LayerCalib(layer, **self.spill.get(layer))
        return self._last

    def __getitem__(self, layer: int) -> LayerCalib:
        found = self.get(layer)
        if found is None:
            raise KeyError(layer)
        return found

    def __contains__(self, layer: object) -> bool:
        return layer in self.layers


MAX_TOKENS, SEQ_LEN, BATCH_SIZE = 16384, 512, 4  # the sample's defaults


def capture_calibration(source: Path, layout: ModelLayout, sources: list[DataSource], *,
                        max_tokens: int = MAX_TOKENS, seq_len: int = SEQ_LEN,
                        batch_size: int = BATCH_SIZE,
                        fraction: tuple[float, float] = (0.0, 1.0), text_field: str = "text",
                        device: str = "cpu", tokenizer: str | None = None,
                        dtype: str = "auto", max_memory: str | int | None = "auto",
                        stream: bool | None = None, hidden_ram: int | None = None,
                        trust_remote_code: bool = False, log: Any = None) -> CapturedLayers:
    """LayerCalib for every MoE layer on at most `max_tokens` tokens of `sources` (tokens are
    drawn from the domains in turn, `max_tokens / len(sources)` each). `log(line)` gets the
    runtime's mode line."""
    check_calibrated(layout)
    tok = load_tokenizer(source, tokenizer, trust_remote_code)
    per_domain = domain_tokens(max_tokens, len(sources))
    domains = moekit.calib.data.load_domains(sources, tok, seq_len=seq_len, max_tokens=per_domain,
                                             fraction=fraction, text_field=text_field)
    work = sample_batches(domains, batch_size, per_domain)
    engine = moekit.runtime.engine.open_model(source, device=device, dtype=dtype,
                                              max_memory=max_memory, stream=stream,
                                              hidden_ram=hidden_ram,
                                              trust_remote_code=trust_remote_code)
    if log is not None:
        log(mode_line(engine))
    require_whole_layers(engine, "calibrated merging")
    spill, layers = _capture(engine, source, layout, work)
    return CapturedLayers(spill, layers, sum(take for _, take in work), engine.describe())


def check_calibrated(layout: ModelLayout) -> None:
    """Refuse families whose router scales the experts' input (no calibrated grouping/fits)."""
    if layout.family.router.input_scaled:
        raise UnsupportedModelError(
            f"{layout.family.name} scales the experts' input by the router score, so calibrated "
            "grouping and fitting are not defined", "use --group weight --method average|aligned")


def domain_tokens(max_tokens: int, num_sources: int) -> int:
    """Positions the sample draws from each domain: max_tokens // domains (at least 1)."""
    return max(1, max_tokens // max(1, num_sources))


def sample_batches(domains: list[Any], batch_size: int, per_domain: int
                   ) -> list[tuple[Any, int]]:
    """(batch [B, S], token rows kept) in run order: each domain's batches until it has
    given `per_domain` positions (the last batch cut)."""
    work = []
    for domain in domains:
        seen = 0
        for batch in batches(domain, batch_size):
            if seen >= per_domain:
                break
            take = min(int(batch.numel()), per_domain - seen)
            work.append((batch, take))
            seen += take
    return work


def _capture(engine: Any, source: Path, layout: ModelLayout,
             work: list[tuple[Any, int]]) -> tuple[Any, list[int]]:
    """One layered run; each MoE layer's record spilled once its batches went through."""
    blocks = {b.layer: b for b in moe_blocks(engine.model, layout.family)}
    spill = TensorSpill("moekit-merge-calib-", engine.spill_dir)
    state: dict[str, Any] = {}

    def on_layer(step: Any) -> None:
        if step.index in blocks:
            state["grab"], state["handles"] = grab_block(blocks[step.index],
                                                         layout.family.router.logits_index)

    def before(index: int) -> None:
        if "grab" in state:
            state["grab"].take = work[index][1]

    def after_layer(step: Any) -> None:
        if "grab" not in state:
            return
        for handle in state.pop("handles"):
            handle.remove()
        spill.put(step.index, layer_record(source, layout, grabbed(state.pop("grab"),
                                                                   step.index)))

    try:
        for _ in engine.run([batch for batch, _ in work], before=before, on_layer=on_layer,
                            after_layer=after_layer):
            pass
    finally:
        for handle in state.get("handles", ()):
            handle.remove()
    return spill, sorted(spill.names)


def selection_bias(source: Path, layout: ModelLayout, layer: int) -> torch.Tensor | None:
    """The layer's selection bias [E] (`e_score_correction_bias`), None when it has none."""
    moe = next(m for m in layout.moe_layers if m.index == layer)
    if not moe.selection_bias:
        return None
    return Checkpoint(source).read(moe.selection_bias).float().reshape(-1)


def route(layout: ModelLayout, logits: torch.Tensor, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's top-k ids [N, k] and gate weights [N, k] from raw router logits [N, E]."""
    return replay(logits, Routing.of(layout.family, layout.config), bias)
