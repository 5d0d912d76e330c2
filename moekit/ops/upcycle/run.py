"""`moekit upcycle`: turn a dense checkpoint into an MoE checkpoint of a stock family.

Streaming: the dense checkpoint is read one tensor at a time; everything outside the FFNs is
copied as bytes; routed and shared experts and routers are produced lazily while their shard is
written, one dense layer cached at a time. Every input tensor must end up written (copied or
transformed): this is checked before the output folder appears.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.errors import CheckpointError
from moekit.io.card import provenance, write_model_card, write_provenance
from moekit.io.config import write_config
from moekit.io.dtypes import ITEM_SIZE
from moekit.io.output import check_output, copy_aux_files, staged_output
from moekit.io.writer import OutTensor, write_checkpoint
from moekit.ops.upcycle import router
from moekit.ops.upcycle.bytes import Scratch, encode
from moekit.ops.upcycle.calib import capture_ffn_inputs
from moekit.ops.upcycle.card import card_body, provenance_details
from moekit.ops.upcycle.config import finish_validation, start_validation
from moekit.ops.upcycle.experts import (
    ROLES,
    DenseFfn,
    Recipe,
    expert_producer,
    read_tensor,
    shared_producer,
    split_groups,
)
from moekit.ops.upcycle.plan import UpcycleOptions, UpcyclePlan, plan_upcycle
from moekit.ops.upcycle.router import random_router
from moekit.ops.upcycle.types import Prepared, UpcycleReport

if TYPE_CHECKING:
    import numpy as np


NEURON_MAP = "moekit_upcycle_neurons.json"
SCRATCH = ".moekit-upcycle-scratch.bin"
__all__ = ["UpcycleOptions", "UpcycleReport", "plan_upcycle", "upcycle", "output_tensors"]


def upcycle(source: Path, out: Path, options: UpcycleOptions, *, overwrite: bool = False,
            source_name: str | None = None,
            on_tensor: Callable[[OutTensor], None] | None = None,
            on_start: Callable[[int], None] | None = None) -> UpcycleReport:
    """Write the MoE checkpoint of `source` into `out` (atomically, via a staging folder).

    `on_start(count)` is called with the number of output tensors before writing, and
    `on_tensor(t)` after each one (progress bars).
    """
    source = Path(source)
    plan = plan_upcycle(source, options)
    check_output(Path(out), overwrite, (source,))
    prepared = prepare(plan)
    consumed: set[str] = set()

    def written(tensor: OutTensor) -> None:
        if tensor.copy_of is not None:
            consumed.add(tensor.copy_of.name)
        if on_tensor:
            on_tensor(tensor)

    with staged_output(Path(out), overwrite, (source,)) as staging:
        scratch, validation = Scratch(staging / SCRATCH), None
        try:
            tensors = output_tensors(plan, prepared, consumed, scratch)
            scratch.flush()
            validation = start_validation(plan.config, plan.family, plan.shape)
            if on_start:
                on_start(len(tensors))
            write_checkpoint(staging, tensors, max_shard_bytes=options.max_shard_bytes,
                             on_tensor=written)
        except BaseException:
            if validation is not None:
                validation.kill()
                validation.wait()
            raise
        finally:
            scratch.close()
        finish_validation(validation)
        missing = sorted(set(plan.checkpoint.tensors) - consumed)
        if missing:
            raise CheckpointError(f"{len(missing)} input tensors were not written, e.g. "
                                  f"{missing[:3]}", "this is a bug in moekit upcycle")
        report = summarize(plan, prepared, tensors, Path(out))
        _write_metadata(staging, plan, prepared, report, source, source_name or str(source))
    return report


def prepare(plan: UpcyclePlan) -> Prepared:
    """Neuron groups (split) and data routers, from calibration text when asked."""
    opts = plan.options
    prepared = Prepared()
    needs_data = opts.router == "data" or (opts.method == "split" and
                                           opts.split_order == "cluster")
    if needs_data:
        prepared.calibration = capture_ffn_inputs(plan.checkpoint.folder, opts.data,
                                                  run=opts.run)
    if opts.method == "split":
        prepared.groups, prepared.shared = {}, {}
    if opts.router == "data":
        prepared.routers = {}
    for layer in plan.ffn_keys:
        _prepare_layer(plan, prepared, layer)
    return prepared


def _prepare_layer(plan: UpcyclePlan, prepared: Prepared, layer: int) -> None:
    opts = plan.options
    shared = plan.shared_width or 0
    inputs = prepared.calibration.inputs[layer] if prepared.calibration else None
    acts = None
    if inputs is not None and (opts.method == "split"):
        keys = plan.ffn_keys[layer]
        gate, up = (read_tensor(plan.checkpoint.tensors[keys[r]]) for r in ("gate", "up"))
        acts = router.neuron_activations(inputs, gate, up)
    if prepared.groups is not None and prepared.shared is not None:
        if opts.split_order == "cluster":
            assert acts is not None
            groups, shared_ids = router.cluster_neurons(acts, opts.experts, shared, opts.seed,
                                                        layer)
        else:
            groups, shared_ids = split_groups(plan.width, opts.experts, shared,
                                              opts.split_order, opts.seed, layer)
        prepared.groups[layer], prepared.shared[layer] = groups, shared_ids
    if prepared.routers is not None:
        assert inputs is not None
        if acts is not None and prepared.groups is not None:
            prepared.routers[layer] = router.mass_router(inputs, acts, prepared.groups[layer])
        else:
            prepared.routers[layer] = router.kmeans_router(inputs, opts.experts, opts.seed, layer)


def output_tensors(plan: UpcyclePlan, prepared: Prepared, consumed: set[str],
                   scratch: Scratch | None) -> list[OutTensor]:
    """Every output tensor in order: tensors outside the layers, then each layer's own
    tensors followed by its MoE block. No dense weight is read here; routers and zero
    tensors go to `scratch` (None: a dry run, they are only planned)."""
    ffn_names = {name for roles in plan.ffn_keys.values() for name in roles.values()}
    opts = plan.options
    recipe = Recipe(opts.method, opts.experts, plan.routed_scale, plan.shared_scale,
                    opts.drop_ratio, opts.seed, prepared.groups,
                    prepared.shared if opts.method == "split" else None)
    ffn = DenseFfn(plan.checkpoint, plan.ffn_keys, consumed)
    by_layer: dict[int | None, list[str]] = {}
    for name in plan.checkpoint.keys():
        if name not in ffn_names:
            by_layer.setdefault(_layer_of(plan, name), []).append(name)
    tensors = [OutTensor.copy(plan.checkpoint.tensors[n]) for n in by_layer.pop(None, [])]
    for layer in plan.ffn_keys:
        tensors += [OutTensor.copy(plan.checkpoint.tensors[n]) for n in by_layer.pop(layer, [])]
        tensors += _moe_block(plan, prepared, recipe, ffn, layer, scratch)
    for names in by_layer.values():  # layers without an FFN (none in supported families)
        tensors += [OutTensor.copy(plan.checkpoint.tensors[n]) for n in names]
    return tensors


def _layer_of(plan: UpcyclePlan, name: str) -> int | None:
    for layer, prefix in plan.prefixes.items():
        if name.startswith(prefix):
            return layer
    return None


def _moe_block(plan: UpcyclePlan, prepared: Prepared, recipe: Recipe, ffn: DenseFfn,
               layer: int, scratch: Scratch | None) -> list[OutTensor]:
    """Router, routed experts (expert-major, gate/up/down) and the shared expert of a layer."""
    prefix, family, opts = plan.prefixes[layer], plan.family, plan.options
    hidden, dtype, width = plan.hidden, plan.dtype, plan.expert_width
    shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
    router = _router_values(plan, prepared, layer) if scratch else None
    tensors = [_small(scratch, prefix + family.router.weight, dtype, (opts.experts, hidden),
                      router)]
    for expert in range(opts.experts):
        for role in ROLES:
            name = prefix + family.experts.per_expert_key(expert, role)
            if recipe.is_plain_copy(role):
                tensors.append(OutTensor.copy(plan.checkpoint.tensors[plan.ffn_keys[layer][role]],
                                              name=name))
            else:
                produce = expert_producer(ffn, recipe, layer, expert, role)
                tensors.append(OutTensor.computed(name, dtype, shapes[role], produce))
    if plan.shared_width is not None:
        tensors += _shared_block(plan, recipe, ffn, layer, scratch)
    return tensors


def _shared_block(plan: UpcyclePlan, recipe: Recipe, ffn: DenseFfn, layer: int,
                  scratch: Scratch | None) -> list[OutTensor]:
    """Qwen2-MoE's shared expert (width 0 when not asked for) and its zero sigmoid gate."""
    prefix, family, hidden, dtype = plan.prefixes[layer], plan.family, plan.hidden, plan.dtype
    width = plan.shared_width or 0
    shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
    expert_prefix, gate_prefix = family.shared_prefixes[0], family.shared_prefixes[1]
    tensors = []
    for role in ROLES:
        name = f"{prefix}{expert_prefix}{family.experts.projections[role]}.weight"
        if width and recipe.is_plain_copy(role, shared=True):
            info = plan.checkpoint.tensors[plan.ffn_keys[layer][role]]
            tensors.append(OutTensor.copy(info, name=name))
        elif width:
            tensors.append(OutTensor.computed(name, dtype, shapes[role],
                                              shared_producer(ffn, recipe, layer, role)))
        else:
            tensors.append(_small(scratch, name, dtype, shapes[role], None))
    tensors.append(_small(scratch, f"{prefix}{gate_prefix}weight", dtype, (1, hidden), None))
    return tensors


def _small(scratch: Scratch | None, name: str, dtype: str, shape: tuple[int, ...],
           values: np.ndarray | None) -> OutTensor:
    """A new small tensor (zeros when `values` is None) stored in the scratch file and
    copied from there by the writer."""
    if scratch is None:
        return OutTensor(name, dtype, tuple(shape))  # planned only (dry run)
    import numpy as np

    data = encode(np.zeros(shape, dtype=np.float32) if values is None else values, dtype)
    return OutTensor.copy(scratch.add(name, dtype, shape, data))


def _router_values(plan: UpcyclePlan, prepared: Prepared, layer: int) -> np.ndarray:
    """[E, H] float32 router weights of `layer`."""
    import numpy as np

    opts = plan.options
    if opts.router == "data":
        assert prepared.routers is not None
        return prepared.routers[layer].numpy()
    if opts.router == "zero":
        return np.zeros((opts.experts, plan.hidden), dtype=np.float32)
    return random_router(opts.seed, layer, opts.experts, plan.hidden, opts.router_std)


def summarize(plan: UpcyclePlan, prepared: Prepared, tensors: list[OutTensor],
            out: Path) -> UpcycleReport:
    opts = plan.options
    total = sum(t.nbytes // max(1, _item(t)) for t in tensors)
    per_expert = 3 * plan.hidden * plan.expert_width
    active = total - len(plan.ffn_keys) * (opts.experts - opts.top_k) * per_expert
    return UpcycleReport(
        out=str(out), family=plan.family.name, architecture=plan.family.architectures[0],
        method=opts.method, experts=opts.experts, top_k=opts.top_k,
        expert_width=plan.expert_width, shared_width=plan.shared_width or 0,
        router=opts.router, total_params=total, active_params=active,
        output_bytes=sum(t.nbytes for t in tensors), function_preserving=plan.preservation,
        calibration_tokens=prepared.calibration.tokens if prepared.calibration else 0,
        kernel_note=kernel_note(plan.expert_width, plan.dtype))


def kernel_note(width: int, dtype: str) -> str:
    """A warning when transformers' default `grouped_mm` experts kernel cannot run experts of
    this width (rows must be multiples of 16 bytes; `runtime.loading.runnable_experts`)."""
    row = width * ITEM_SIZE[dtype]
    if row % 16 == 0:
        return ""
    return (f"expert width {width} ({row} bytes per {dtype} row) is not a multiple of 16 bytes: "
            "transformers' default grouped_mm experts kernel cannot run it; load the output with "
            "experts_implementation=\"eager\" (moekit profile/eval do), or choose --experts so "
            "that the width is a multiple of 8")


def _item(tensor: OutTensor) -> int:
    return ITEM_SIZE[tensor.dtype]


def _write_metadata(folder: Path, plan: UpcyclePlan, prepared: Prepared,
                    report: UpcycleReport, source: Path, source_name: str) -> None:
    """config.json (the dict built from the dense config), aux files, neuron map,
    provenance and model card."""
    write_config(plan.config, folder)
    copy_aux_files(source, folder)
    if prepared.groups is not None and prepared.shared is not None:
        neurons = {str(layer): {"experts": prepared.groups[layer].tolist(),
                                "shared": prepared.shared[layer].tolist()}
                   for layer in prepared.groups}
        (folder / NEURON_MAP).write_text(json.dumps(neurons) + "\n")
    details = provenance_details(plan, prepared, report)
    write_provenance(folder, provenance("upcycle", source_name, **details))
    title, summary, body = card_body(plan, report, source_name)
    write_model_card(folder, base_model=source_name, title=title, summary=summary,
                     tags=["upcycled", "moe", plan.family.name, plan.options.method], body=body,
                     source_card=source / "README.md")
