"""Multiply-adds of a forward pass and of a reconstruction step: the reconstruction's budget
in forward passes, as a step count that does not depend on the machine or its load.

A plain forward costs, per position, one multiply-add per active parameter (every parameter
but the routed experts a token does not use, `E - k` of `E` per MoE layer, and the input
embedding table, which is read rather than multiplied) plus the attention's scores and
weighted sum over the causal context (on average half the window, 2 x ctx x heads x head_dim
per layer). One reconstruction step of `b` positions runs the k routed experts of each
forward and backward (~3 x b x k x P_e, P_e one routed expert's parameters); every
`reconstruct.CHECK_EVERY` steps the held-out positions run forward once more.
`reconstruct_step_cap` turns "at most F forward passes over the calibration positions" into
the largest step count whose multiply-adds stay within F such passes (at least one check's
worth, `CHECK_EVERY` steps), so a run's output is the same whatever else the machine does.
On this CPU the measured times follow these counts within ~1.5x (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

from moekit.families.registry import first_value
from moekit.layerfit.compensate import HELD_OUT
from moekit.layerfit.reconstruct import BATCH, CHECK_EVERY


def forward_macs(model: Any, blocks: list[Any], top_k: int, config: dict[str, Any],
                 seq_len: int) -> float:
    """Multiply-adds of one position through `model` (module docstring); `blocks` its MoE
    blocks (`runtime.layers.MoeBlock`), parameters counted from their shapes (meta tensors
    of a streamed model too)."""
    total = sum(p.numel() for p in model.parameters())  # a tied table once
    embed = getattr(model.get_input_embeddings(), "weight", None)
    head = getattr(model.get_output_embeddings(), "weight", None)
    if embed is not None and embed is not head:
        total -= embed.numel()
    for block in blocks:
        num = max(1, int(block.experts.num_experts))
        routed = sum(p.numel() for p in block.experts.parameters())
        total -= routed * (1 - min(top_k, num) / num)
    return float(total) + _attention_macs(config, seq_len)


def _attention_macs(config: dict[str, Any], seq_len: int) -> float:
    hidden = int(first_value(config, ("hidden_size", "d_model", "n_embd")) or 0)
    heads = int(first_value(config, ("num_attention_heads", "n_head")) or 1)
    head_dim = int(config.get("head_dim") or hidden // max(heads, 1))
    layers = int(first_value(config, ("num_hidden_layers", "n_layer")) or 0)
    return 2.0 * (seq_len / 2) * heads * head_dim * layers


def expert_params(block: Any) -> float:
    """Parameters of one routed expert of `block`."""
    num = max(1, int(block.experts.num_experts))
    return sum(p.numel() for p in block.experts.parameters()) / num


def reconstruct_step_cap(forwards: float, positions: int, per_position: float,
                         blocks: list[Any], top_k: int, cap: int, fitted: int = 0) -> int:
    """Steps per MoE layer whose multiply-adds over all `blocks` stay within `forwards`
    forward passes of `per_position` multiply-adds over `positions` (module docstring),
    within [CHECK_EVERY, cap]; `fitted`: the positions the reconstruction runs on (0:
    `positions`; more when the refit streams)."""
    if not blocks or positions <= 0:
        return cap
    held = (fitted or positions) * HELD_OUT
    batch = min(BATCH, max(1, (fitted or positions) - held))
    per_step = sum(top_k * expert_params(b) * (3 * batch + held / CHECK_EVERY) for b in blocks)
    found = int(forwards * positions * per_position / max(per_step, 1.0))
    return max(min(found, cap), min(CHECK_EVERY, cap))
