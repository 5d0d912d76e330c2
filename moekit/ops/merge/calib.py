"""Calibration activations for data-driven grouping and output fitting, behind one function.

`capture_calibration` runs the in-memory model on a bounded token sample through
`moekit.calib.capture` (MoE-block inputs X [N, H] and router logits Z [N, E] per layer) and turns
the logits into the model's own top-k ids and gate weights with the family's routing function.
A layer-streaming engine can later provide the same `LayerCalib` records one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def capture_calibration(source: Path, layout: ModelLayout, sources: list[DataSource], *,
                        max_tokens: int = 4096, seq_len: int = 512, batch_size: int = 4,
                        fraction: tuple[float, float] = (0.0, 1.0), text_field: str = "text",
                        device: str = "cpu", tokenizer: str | None = None
                        ) -> dict[int, LayerCalib]:
    """LayerCalib for every MoE layer on at most `max_tokens` tokens of `sources` (tokens are
    drawn from the domains in turn, `max_tokens / len(sources)` each)."""
    import torch

    from moekit.calib.capture import capture_layers
    from moekit.calib.data import batches, load_domains
    from moekit.errors import UnsupportedModelError
    from moekit.runtime.loading import load_model, load_tokenizer

    if layout.family.router.input_scaled:
        raise UnsupportedModelError(
            f"{layout.family.name} scales the experts' input by the router score, so calibrated "
            "grouping and fitting are not defined", "use --group weight --method average|aligned")
    tok = load_tokenizer(source, tokenizer)
    per_domain = max(1, max_tokens // max(1, len(sources)))
    domains = load_domains(sources, tok, seq_len=seq_len, max_tokens=per_domain,
                           fraction=fraction, text_field=text_field)
    model = load_model(source, device=device, dtype="float32")
    captures: dict[int, list[Any]] = {}
    for domain in domains:
        for layer, cap in capture_layers(model, layout.family, batches(domain, batch_size),
                                         max_tokens=per_domain, outputs=False).items():
            captures.setdefault(layer, []).append(cap)
    del model
    result = {}
    for layer, caps in captures.items():
        inputs = torch.cat([c.inputs.float() for c in caps])
        logits = torch.cat([c.logits.float() for c in caps])
        ids, weights = route(layout, logits, selection_bias(source, layout, layer))
        result[layer] = LayerCalib(layer, inputs, logits, ids, weights.float())
    return result


def selection_bias(source: Path, layout: ModelLayout, layer: int) -> torch.Tensor | None:
    """The layer's selection bias [E] (`e_score_correction_bias`), None when it has none."""
    from moekit.io.reader import Checkpoint

    moe = next(m for m in layout.moe_layers if m.index == layer)
    if not moe.selection_bias:
        return None
    return Checkpoint(source).read(moe.selection_bias).float().reshape(-1)


def route(layout: ModelLayout, logits: torch.Tensor, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's top-k ids [N, k] and gate weights [N, k] from raw router logits [N, E]."""
    from moekit.calib.routing import Routing
    from moekit.calib.routing import route as replay

    return replay(logits, Routing.of(layout.family, layout.config), bias)
