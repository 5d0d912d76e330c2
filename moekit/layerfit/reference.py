"""The unmodified model's residual stream after each MoE layer, recorded during another pass.

A down refit fits the kept experts of layer l to the unmodified model's decoder-layer output
R_l [n, H] on its calibration windows (`measured.measure_layer`'s `reference`; `lanes` captures
it from an `original` lane otherwise: one more copy of the windows through every layer, and one
more capture of each MoE layer). A pass that already runs the unmodified model over those
windows (the routing statistics of `prune --data --effort fast`) can record R_l on the way:
`ReferenceResiduals` hooks every MoE decoder layer; while one of the first `batches` windows
runs, the layer's output rows [B·S, H] (the engine's dtype) go to a spill file of their own
(one per layer and window, `runtime.spill`), so the pass holds none of them in memory and the
order of the engine (whole model per window, or layer by layer) does not matter. `get(layer)`
concatenates layer l's rows in window order: the rows `calib.capture.capture_step` gives for
those windows, in that order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from moekit.calib.capture import MoeBlock
    from moekit.runtime.spill import TensorSpill


class ReferenceResiduals:
    """Record R_l of the windows 0 .. `batches` - 1 of a run (module docstring). Use as a
    context manager around the run (the hooks live inside it) and call `before(index)` before
    window `index` runs (the engine's `before`)."""

    def __init__(self, blocks: list[MoeBlock], batches: int, spill: TensorSpill):
        self.blocks, self.batches, self.spill = blocks, batches, spill
        self.layers = [b.layer for b in blocks]
        self.current: int | None = None
        self.handles: list[Any] = []

    def __enter__(self) -> ReferenceResiduals:
        for block in self.blocks:
            hook = self._hook(block.layer)
            self.handles.append(block.decoder_layer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.current = [], None

    def before(self, index: int) -> None:
        """Window `index` runs next."""
        self.current = index

    def _key(self, layer: int, batch: int) -> int:
        return self.layers.index(layer) * self.batches + batch

    def _hook(self, layer: int) -> Any:
        def record(module: Any, args: tuple, output: Any) -> None:
            batch = self.current
            if batch is None or batch >= self.batches:
                return
            y = output[0] if isinstance(output, tuple) else output
            self.spill.put(self._key(layer, batch), {"r": y.detach().reshape(-1, y.shape[-1])})
        return record

    def get(self, layer: int) -> torch.Tensor:
        """R_l [n, H] of the recorded windows, in window order."""
        import torch

        missing = [b for b in range(self.batches) if self._key(layer, b) not in self.spill.names]
        if missing:
            raise RuntimeError(f"layer {layer}: no reference residuals of windows {missing} "
                               "(internal error)")
        return torch.cat([self.spill.read(self._key(layer, b), "r")
                          for b in range(self.batches)])

    def close(self) -> None:
        self.spill.close()
