"""Sub-layer streaming: a MoE layer whose routed experts do not fit run in expert groups."""

from __future__ import annotations

from typing import Any


def mark_grouped(engine: Any) -> None:
    """Flag the layers that run in expert groups (plan.group > 0)."""


def split_experts(engine: Any, layer: Any, name: str, prefix: str) -> bool:
    """True when tensor `name` is a routed-expert tensor read group by group."""
    return False


def run_grouped(engine: Any, step: Any, before: Any, progress: Any, num_layers: int) -> None:
    raise NotImplementedError
