"""How a command runs a model: one frozen record built once by the CLI (`cli/common.py`,
`run_data_options`) and passed down as is, never rewritten mid-run.

    device             auto (CUDA when present, else CPU), cpu, cuda, cuda:N, xpu, mps
    dtype              auto (float32 on a CPU, the checkpoint's on an accelerator:
                       `runtime.loading.load_dtype`), float32, bfloat16, float16
    max_memory         weight memory the run may hold: "auto" (80% of the free RAM/VRAM,
                       `runtime.budget`), a size ("40GB") or bytes
    trust_remote_code  run Python code shipped inside the checkpoint (auto_map)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RunOptions:
    """Device, load dtype, memory budget and remote-code permission of one run."""

    device: str = "auto"
    dtype: str = "auto"
    max_memory: str | int | None = "auto"
    trust_remote_code: bool = False

    def engine(self) -> dict[str, Any]:
        """The keyword arguments of `runtime.engine.open_model` this record sets."""
        return asdict(self)
