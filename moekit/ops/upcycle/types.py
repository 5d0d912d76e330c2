"""Result types of an upcycle run, shared by the runner and the model-card writer."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from moekit.ops.upcycle.calib import FfnInputs


@dataclass
class UpcycleReport:
    """What was written. Parameter counts: total = sum of numel; active = total minus the
    (E - k) routed experts a token skips in every layer."""

    out: str
    family: str
    architecture: str
    method: str
    experts: int
    top_k: int
    expert_width: int
    shared_width: int
    router: str
    total_params: int
    active_params: int
    output_bytes: int
    function_preserving: str
    calibration_tokens: int = 0
    kernel_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prepared:
    """Per-layer results computed before writing: neuron groups, shared neurons, routers."""

    groups: dict[int, torch.Tensor] | None = None
    shared: dict[int, torch.Tensor] | None = None
    routers: dict[int, torch.Tensor] | None = None
    calibration: FfnInputs | None = None
