"""Tensor-level helpers of checkpoint surgery, shared by the prune and merge writers.

`take_rows` slices a tensor into byte ranges of the source file (no read, no copy);
`renamed_expert_key` renumbers a per-expert tensor name; `patch_config` rewrites the expert
count (and grouped-routing keys) in config.json; `account` / `check_accounted` make sure every
source tensor was handled exactly once before anything is written.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from moekit.errors import CheckpointError
from moekit.families.layout import ModelLayout
from moekit.io.config import set_existing, sub_config
from moekit.io.reader import Checkpoint, TensorInfo
from moekit.io.writer import OutTensor
from moekit.surgery.plan import PrunePlan


def take_rows(info: TensorInfo, rows: list[int], axis: int = 0) -> OutTensor:
    """`info` restricted to indices `rows` along `axis`, as byte ranges of the source file.

    Valid when every axis before `axis` has size 1 (axis 0 of any tensor, the last axis of
    [E] or [1, E]); adjacent rows are merged into one range."""
    if math.prod(info.shape[:axis]) != 1:
        raise CheckpointError(f"cannot slice '{info.name}' {list(info.shape)} on axis {axis} "
                              "as byte ranges", "only leading-axis slices are supported")
    row_bytes = info.nbytes // info.shape[axis] if info.shape[axis] else 0
    pieces: list[TensorInfo] = []
    for row in rows:
        if not 0 <= row < info.shape[axis]:
            raise CheckpointError(f"row {row} is outside '{info.name}' {list(info.shape)}")
        start = info.start + row * row_bytes
        if pieces and pieces[-1].end == start:
            last = pieces.pop()
            pieces.append(TensorInfo(info.name, info.dtype, (), info.shard, last.start,
                                     start + row_bytes))
        else:
            pieces.append(TensorInfo(info.name, info.dtype, (), info.shard, start,
                                     start + row_bytes))
    shape = (*info.shape[:axis], len(rows), *info.shape[axis + 1:])
    return OutTensor.gather(info.name, info.dtype, shape, tuple(pieces))


def account(actions: dict[str, str], key: str, action: str) -> None:
    """Record that source tensor `key` was handled by `action` (twice is an internal error)."""
    if key in actions:
        raise CheckpointError(f"tensor '{key}' is handled twice by the surgery (internal error)")
    actions[key] = action


def check_accounted(checkpoint: Checkpoint, actions: dict[str, str],
                    outputs: dict[str, OutTensor]) -> None:
    """Every source tensor handled, none unknown, no output name twice (else CheckpointError)."""
    missing = [k for k in checkpoint.tensors if k not in actions]
    extra = [k for k in actions if k not in checkpoint.tensors]
    names = [t.name for t in outputs.values()]
    if missing or extra or len(set(names)) != len(names):
        raise CheckpointError(f"surgery left tensors unaccounted (missing {missing[:3]}, unknown "
                              f"{extra[:3]}, duplicate output names: "
                              f"{len(names) - len(set(names))}); nothing was written")


def patch_config(config: dict[str, Any], layout: ModelLayout, plan: PrunePlan,
                 expert_width: int | None = None) -> tuple[dict[str, Any], list[str], list[str]]:
    """A copy of config.json with every expert-count alias (and grouped-routing keys when the
    plan changes them) rewritten, keeping key names and value types. Returns (config, keys
    changed, warnings about other per-expert values left as they were)."""
    patched = copy.deepcopy(config)
    sub = sub_config(patched, layout.resolved.config_path)
    path = ".".join(layout.resolved.config_path)
    prefix = f"{path}." if path else ""
    keys = layout.family.keys
    changed = set_existing(sub, keys.num_experts, plan.num_kept)
    if not changed:
        raise CheckpointError(f"config.json has none of {keys.num_experts}; cannot record the "
                              "new expert count")
    if expert_width is not None:
        changed += set_existing(sub, keys.expert_width, expert_width)
    aliases = {"n_group": keys.n_group, "topk_group": keys.topk_group}
    for name, value in plan.config_changes.items():
        changed += set_existing(sub, aliases.get(name, (name,)), value)
    warnings = []
    if layout.mtp_layers and plan.num_dropped:
        mtp_keys = ("num_nextn_predict_layers", "mtp_num_hidden_layers")
        changed += set_existing(sub, mtp_keys, 0)
        warnings.append(f"the multi-token-prediction layer(s) "
                        f"{', '.join(m.prefix.rstrip('.') for m in layout.mtp_layers)} were "
                        "dropped: their experts have no statistics (transformers never runs "
                        "them) and would not fit the new expert count; "
                        f"{' / '.join(k for k in mtp_keys if k in sub)} = 0")
    for key, value in sub.items():
        if key in changed or key in keys.num_experts:
            continue
        if isinstance(value, list) and len(value) == plan.num_experts and plan.num_dropped:
            warnings.append(f"config key '{prefix}{key}' is a list of {plan.num_experts} values "
                            "(one per expert?); left unchanged, check it")
        elif (isinstance(value, int) and not isinstance(value, bool) and value == plan.num_experts
              and "expert" in key and plan.num_dropped):
            warnings.append(f"config key '{prefix}{key}' = {value} equals the old expert count; "
                            "left unchanged, check it")
    return patched, [prefix + k for k in changed], warnings


def renamed_expert_key(layout: ModelLayout, key: str, old: int, new: int) -> str:
    """`{layer}.{experts}.{old}.w1.weight` -> `{layer}.{experts}.{new}.w1.weight`."""
    base = f".{layout.family.experts.prefixes[0].rstrip('.')}."
    head = f"{base}{old}."
    if head not in key:
        raise CheckpointError(f"expert tensor '{key}' does not contain '{head}'")
    start, end = key.rindex(head), key.rindex(head) + len(head)
    return f"{key[:start]}{base}{new}.{key[end:]}"
