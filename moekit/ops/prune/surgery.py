"""Expert pruning surgery on the safetensors files: streamed, tensor by tensor, no model built.

For every MoE layer of the plan:
- per-expert tensors of kept experts are byte copies under renumbered names
  (`...experts.{kept[i]}.w1.weight` -> `...experts.{i}.w1.weight`); dropped ones are not read;
- fused tensors ([E, ...], incl. biases and MXFP4 `_blocks`/`_scales`), the router weight/bias
  rows (axis 0) and the selection bias (`e_score_correction_bias`, last axis of [E] or [1, E])
  keep the rows `kept`, in order, gathered as byte ranges (no torch work either);
- shared experts and every other tensor are copied unchanged.
Every input tensor must end up written, transformed or dropped; this is checked before writing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.errors import CheckpointError
from moekit.families.fingerprint import model_fingerprint
from moekit.families.layout import ModelLayout, MoeLayer, describe
from moekit.io.output import write_model_folder
from moekit.io.reader import Checkpoint
from moekit.io.writer import DEFAULT_SHARD_BYTES, OutTensor
from moekit.ops.prune.report import write_prune_records
from moekit.surgery.plan import PrunePlan, validate_plan
from moekit.surgery.tensors import account, check_accounted, patch_config, take_rows


@dataclass
class PruneResult:
    """What `prune_checkpoint` wrote. `actions` counts input tensors per disposition."""

    out: Path
    plan: PrunePlan
    bytes_written: int
    tensors_written: int
    actions: dict[str, int]
    config_keys: list[str]
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def plan_tensors(checkpoint: Checkpoint, layout: ModelLayout, plan: PrunePlan,
                 modified: dict[str, OutTensor] | None = None
                 ) -> tuple[list[OutTensor], dict[str, str]]:
    """Output tensors (in source byte order) and, for every input key, what happened to it:
    `copied`, `renamed`, `sliced`, `modified` (its output replaced by `modified[key]`, e.g. a
    refitted expert) or `dropped`. Raises if any input key is left unaccounted."""
    actions: dict[str, str] = {}
    outputs: dict[str, OutTensor] = {}
    for layer in layout.moe_layers:
        kept = plan.layer(layer.index).kept
        if len(kept) == layer.num_experts:
            continue  # nothing removed: every tensor passes through unchanged
        for key, out in _layer_tensors(checkpoint, layout, layer, kept):
            account(actions, key, "dropped" if out is None else (
                "renamed" if out.copy_of is not None else "sliced"))
            if out is not None:
                outputs[key] = out
    if actions:  # experts changed: the MTP block's experts would no longer fit the config
        actions.update((key, "dropped") for key in layout.mtp_keys(list(checkpoint.tensors)))
    for key, info in checkpoint.tensors.items():
        if key not in actions:
            actions[key] = "copied"
            outputs[key] = OutTensor.copy(info)
    for key, tensor in (modified or {}).items():
        if actions.get(key) in (None, "dropped"):
            raise CheckpointError(f"tensor '{key}' is modified but not kept (internal error)")
        actions[key], outputs[key] = "modified", tensor
    check_accounted(checkpoint, actions, outputs)
    order = sorted(checkpoint.tensors.values(), key=lambda i: (str(i.shard), i.start))
    return [outputs[i.name] for i in order if i.name in outputs], actions


def _layer_tensors(checkpoint: Checkpoint, layout: ModelLayout, layer: MoeLayer,
                   kept: list[int]) -> list[tuple[str, OutTensor | None]]:
    tensors = checkpoint.tensors
    result: list[tuple[str, OutTensor | None]] = []
    new_id = {old: new for new, old in enumerate(kept)}
    if layer.expert_keys:
        base = layer.prefix + layout.family.experts.prefixes[0].rstrip(".") + "."
        for old, keys in enumerate(layer.expert_keys):
            for key in keys:
                head = f"{base}{old}."
                if not key.startswith(head):
                    raise CheckpointError(f"expert tensor '{key}' does not start with '{head}'")
                renamed = f"{base}{new_id[old]}.{key[len(head):]}" if old in new_id else None
                result.append((key, OutTensor.copy(tensors[key], renamed) if renamed else None))
    for key in (*layer.router_keys, *layer.fused_keys):
        result.append((key, take_rows(tensors[key], kept, axis=0)))
    if layer.selection_bias:
        info = tensors[layer.selection_bias]
        result.append((layer.selection_bias, take_rows(info, kept, axis=len(info.shape) - 1)))
    return result


def prune_checkpoint(source: Path, plan: PrunePlan, out: Path, *, overwrite: bool = False,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, ignore_fingerprint: bool = False,
                     on_bytes: Callable[[int, int], None] | None = None,
                     modified: dict[str, OutTensor] | None = None,
                     expert_width: int | None = None, source_name: str | None = None,
                     stats_folder: Path | None = None,
                     budget: list[dict[str, Any]] | None = None,
                     calibration: dict[str, Any] | None = None,
                     evaluate: Callable[[Path], dict[str, Any] | None] | None = None
                     ) -> PruneResult:
    """Write the pruned checkpoint of `source` into `out` (staged: whole or nothing), with its
    `moekit_provenance.json` and model card.

    `on_bytes(written, total)` is called once with written=0 and after every tensor (progress).
    `modified` replaces the output of some input keys (refitted experts, `rewrite.py`;
    trimmed experts, `trim.py`, with `expert_width` their new width for config.json).
    The records name the model as `source_name` (the user's folder or repo id; default
    `source`) and carry `stats_folder`, the plan's `budget` rows and the `--data`
    `calibration` record; `evaluate(staging_folder)`, run after the weights are written and
    before the rename, adds its numbers (result.extra["evaluation"])."""
    checkpoint = Checkpoint(source)
    layout = describe(checkpoint)
    if not layout.is_moe:
        raise CheckpointError(f"{source} is a dense model ({layout.resolved.family.name}): "
                              "nothing to prune")
    plan = validate_plan(plan, layout, model_fingerprint(checkpoint, layout), ignore_fingerprint)
    tensors, actions = plan_tensors(checkpoint, layout, plan, modified)
    config, config_keys, warnings = patch_config(checkpoint.config, layout, plan, expert_width)
    counts = {a: sum(1 for v in actions.values() if v == a) for a in sorted(set(actions.values()))}
    result = PruneResult(Path(out), plan, sum(t.nbytes for t in tensors), len(tensors), counts,
                         config_keys, [*plan.warnings, *warnings])

    def records(folder: Path) -> None:
        evaluation = evaluate(folder) if evaluate is not None else None
        result.extra["evaluation"] = evaluation
        write_prune_records(folder, source_name or str(source), plan, config_keys=config_keys,
                            warnings=result.warnings,
                            stats_folder=str(stats_folder) if stats_folder else None,
                            budget=budget, evaluation=evaluation, source_folder=Path(source),
                            calibration=calibration)

    write_model_folder(checkpoint, Path(out), tensors, config, overwrite=overwrite,
                       max_shard_bytes=max_shard_bytes, on_bytes=on_bytes, finish=records)
    return result
