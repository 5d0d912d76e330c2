"""Capture what enters and leaves every MoE block of an in-memory transformers model.

For each MoE layer l (found through the family record, like `calib.hooks`):
- `inputs`  X_l [N, H]: the hidden states the MoE block receives (forward pre-hook on the block,
  the parent module of the router and the experts),
- `logits`  Z_l [N, E]: the router's raw logits (`output[RouterSpec.logits_index]` of the router),
- `outputs` Y_l [N, H]: what the block returns (routed experts + shared experts, if any),
- `residual` R_l [N, H] (optional): the decoder layer's output hidden states (the residual
  stream after the block is added), to measure how far a modified model has drifted.

N is bounded by `max_tokens`: batches are run until that many token positions were seen (the
last batch is cut), so memory is N x (2H + E) values per captured layer.

Two entry points give the same `LayerCapture` records: `capture_layers` runs a whole in-memory
model; `capture_step` runs the batches through one materialised decoder layer of a layered
`moekit.runtime` run (in memory or streamed), so only that layer's weights and captures are held.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moekit.calib.hooks import MoeModules, find_moe_modules, module_device
from moekit.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

    from moekit.families.spec import MoeFamily


@dataclass
class LayerCapture:
    """One MoE layer's block input X [N, H], router logits Z [N, E] (float32) and block output
    Y [N, H] (None when not asked for), on the same N token positions."""

    layer: int
    inputs: torch.Tensor
    logits: torch.Tensor
    outputs: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True)
class MoeBlock:
    """The MoE block of one decoder layer and its router/experts children."""

    layer: int
    block: Any
    router: Any
    experts: Any
    decoder_layer: Any = None


def moe_blocks(model: Any, family: MoeFamily) -> list[MoeBlock]:
    """The MoE blocks of `model`: the common parent of `RouterSpec.module` and
    `RouterSpec.experts_module` in each decoder layer (e.g. `mlp` for `mlp.gate`/`mlp.experts`)."""
    spec = family.router
    parent = _common_parent(spec.module, spec.experts_module)
    modules = dict(model.named_modules())
    blocks = []
    for mods in find_moe_modules(model, family):
        block = _block_of(modules, mods, parent)
        decoder = _block_of(modules, mods, "")
        blocks.append(MoeBlock(mods.layer, block, mods.router, mods.experts, decoder))
    return blocks


def _common_parent(router: str, experts: str) -> str:
    a, b = router.split("."), experts.split(".")
    common = []
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _block_of(modules: dict[str, Any], mods: MoeModules, parent: str) -> Any:
    """The module named `*.layers.{i}.{parent}` that contains the router."""
    suffix = f"layers.{mods.layer}" + (f".{parent}" if parent else "")
    for name, module in modules.items():
        if (name == suffix or name.endswith("." + suffix)) and any(
                m is mods.router for m in module.modules()):
            return module
    raise UnsupportedModelError(f"no MoE block module '{suffix}' around layer {mods.layer}'s "
                                "router", "the modeling code differs from the family record")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once every requested layer was captured."""


class _Grabber:
    """Hooks of one block; appends [n, H]/[n, E] rows until the token budget is reached."""

    def __init__(self, logits_index: int, keep_outputs: bool):
        self.logits_index, self.keep_outputs = logits_index, keep_outputs
        self.inputs: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.residual: list[torch.Tensor] = []
        self.take = 0  # rows to keep from the current batch

    def on_input(self, module: Any, args: tuple) -> None:
        x = args[0]
        self.inputs.append(x.reshape(-1, x.shape[-1])[: self.take].detach().clone())

    def on_router(self, module: Any, args: tuple, output: Any) -> None:
        import torch

        outputs = output if isinstance(output, tuple) else (output,)
        z = outputs[self.logits_index]
        rows = z.reshape(-1, z.shape[-1])[: self.take]
        self.logits.append(rows.detach().to(torch.float32).clone())

    def on_output(self, module: Any, args: tuple, output: Any) -> None:
        if self.keep_outputs:
            y = output[0] if isinstance(output, tuple) else output
            self.outputs.append(y.reshape(-1, y.shape[-1])[: self.take].detach().clone())

    def on_residual(self, module: Any, args: tuple, output: Any) -> None:
        y = output[0] if isinstance(output, tuple) else output
        self.residual.append(y.reshape(-1, y.shape[-1])[: self.take].detach().clone())


def capture_layers(model: Any, family: MoeFamily, batches: Iterable[torch.Tensor], *,
                   max_tokens: int, layers: Sequence[int] | None = None,
                   outputs: bool = True, residual: bool = False) -> dict[int, LayerCapture]:
    """Run `batches` ([B, S] token ids) through `model` until `max_tokens` positions were seen
    and return the captures of the MoE `layers` (all when None). The forward pass stops after
    the last requested layer (its block, or its decoder layer with `residual`), so capturing
    early layers is cheap."""
    import torch

    if family.router.input_scaled:
        raise UnsupportedModelError(f"{family.name}: the router scales the experts' input",
                                    "layer capture supports top-k routed families only")
    blocks = [b for b in moe_blocks(model, family) if layers is None or b.layer in layers]
    grabbers = {b.layer: _Grabber(family.router.logits_index, outputs) for b in blocks}
    handles = []
    for b in blocks:
        g = grabbers[b.layer]
        handles += [b.block.register_forward_pre_hook(g.on_input),
                    b.router.register_forward_hook(g.on_router),
                    b.block.register_forward_hook(g.on_output)]
        if residual:
            handles.append(b.decoder_layer.register_forward_hook(g.on_residual))
    if blocks:
        last = blocks[-1].decoder_layer if residual else blocks[-1].block
        handles.append(last.register_forward_hook(_raise_stop))
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if seen >= max_tokens:
                    break
                take = min(int(batch.numel()), max_tokens - seen)
                for g in grabbers.values():
                    g.take = take
                try:
                    model(batch.to(module_device(model)), use_cache=False)
                except _Stop:
                    pass
                seen += take
    finally:
        for handle in handles:
            handle.remove()
    return {layer: LayerCapture(layer, torch.cat(g.inputs), torch.cat(g.logits),
                                torch.cat(g.outputs) if g.outputs else None,
                                torch.cat(g.residual) if g.residual else None)
            for layer, g in grabbers.items() if g.inputs}


def grab_block(block: MoeBlock, logits_index: int) -> tuple[_Grabber, list[Any]]:
    """Hooks that record the block input and router logits of every forward of `block` (the
    first `grabber.take` rows of each call); `grabbed(...)` turns them into a LayerCapture.
    Remove the returned handles when done."""
    grab = _Grabber(logits_index, False)
    return grab, [block.block.register_forward_pre_hook(grab.on_input),
                  block.router.register_forward_hook(grab.on_router)]


def grabbed(grab: _Grabber, layer: int) -> LayerCapture:
    import torch

    return LayerCapture(layer, torch.cat(grab.inputs), torch.cat(grab.logits), None,
                        torch.cat(grab.residual) if grab.residual else None)


def capture_step(step: Any, block: MoeBlock, batches: Sequence[int], *, max_tokens: int,
                 logits_index: int, residual: bool = False,
                 select: Callable[[int], None] | None = None) -> LayerCapture:
    """The capture of one MoE layer during a layered engine run (`Engine.run(on_layer=...)`):
    `step.call(b)` for each batch index b in `batches` (the layer's own arguments, its input
    from the engine's hidden-state store, which is left untouched), until `max_tokens`
    positions were seen. Without `residual` the call stops after the router. `select(b)` is
    called before batch b runs (e.g. to tell conditional hooks which tokens these are)."""
    grab, handles = grab_block(block, logits_index)
    if not residual:
        handles.append(block.router.register_forward_hook(_raise_stop))
    seen = 0
    try:
        for b in batches:
            if seen >= max_tokens:
                break
            grab.take = min(int(step.inputs(b).shape[:-1].numel()), max_tokens - seen)
            if select is not None:
                select(b)
            try:
                grab.on_residual(None, (), step.call(b))
            except _Stop:
                pass
            seen += grab.take
    finally:
        for handle in handles:
            handle.remove()
    return grabbed(grab, block.layer)


def _raise_stop(module: Any, args: tuple, output: Any) -> None:
    raise _Stop
