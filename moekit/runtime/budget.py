"""`--max-memory`: how much weight memory a run may hold on its device, and what that implies.

Memory arithmetic (bytes in the load dtype; `resident` = embeddings + final norm + LM head):

    in memory : checkpoint                           <= budget      (auto: <= 80% of free)
    streamed  : resident + 2 x largest layer         <= budget      (CUDA: the next layer
                                                                     prefetched into memory)
                resident + 1 x largest layer         <= budget      (CPU, or no room for two:
                                                                     the next layer's bytes are
                                                                     only hinted to the page cache)
    groups    : resident + layer base + G x expert   <= budget      (base = attention, norms,
                                                                     router, shared experts)

`auto` takes 80% of the free RAM (CPU) or VRAM (CUDA): the whole model when it fits there,
else streaming within that budget. Below `resident + largest base + one expert` nothing can run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.errors import InvalidArgumentError
from moekit.units import human, parse_size

AUTO_FRACTION = 0.8


def free_memory(device: Any) -> float:
    """Free bytes on `device`: VRAM (cuda) or MemAvailable (cpu)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


@dataclass(frozen=True)
class Sizes:
    """What the model needs, in bytes of the load dtype."""

    total: int
    resident: int
    layers: tuple[int, ...]
    bases: tuple[int, ...]  # per layer, without its routed experts
    expert: tuple[int, ...]  # per layer, bytes of one routed expert (0: dense layer)


@dataclass(frozen=True)
class Plan:
    """The decision: `mode` memory | stream, and `group` experts per read in sub-layer mode
    (0: whole layers). `budget` in bytes (None: unlimited)."""

    mode: str
    reason: str
    budget: int | None
    group: int = 0
    prefetch: bool = True

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "max_memory": self.budget,
                "expert_group": self.group or None, "prefetch": self.prefetch}


def decide(sizes: Sizes, max_memory: str | int | None, device: Any,
           stream: bool | None = None) -> Plan:
    """Memory or streaming, whole layers or expert groups (see the module docstring)."""
    auto = max_memory in (None, "auto")
    if auto:
        free = free_memory(device)
        budget = int(AUTO_FRACTION * free)
        where = f"80% of free {'VRAM' if getattr(device, 'type', '') == 'cuda' else 'RAM'}"
        label = f"{where} ({human(budget)})"
    else:
        budget = max_memory if isinstance(max_memory, int) else parse_size(str(max_memory))
        label = f"--max-memory {human(budget)}"
    if stream is False or (stream is None and sizes.total <= budget):
        why = "forced" if stream is False else f"fits in {label}"
        return Plan("memory", f"checkpoint {human(sizes.total)} {why}", None if auto else budget)
    why = "streaming forced" if stream else f"exceeds {label}"
    head = f"checkpoint {human(sizes.total)} {why}"
    largest = max(sizes.layers, default=0)
    on_cuda = getattr(device, "type", str(device)).startswith("cuda")
    if on_cuda and sizes.resident + 2 * largest <= budget:
        return Plan("stream", f"{head}: whole layers, next one prefetched", budget)
    if sizes.resident + largest <= budget:
        return Plan("stream", f"{head}: whole layers, next one read ahead by the page cache",
                    budget, prefetch=False)
    return _groups(sizes, budget, head)


def _groups(sizes: Sizes, budget: int, head: str) -> Plan:
    dense = max((b for b, e in zip(sizes.layers, sizes.expert, strict=True) if not e), default=0)
    base = max((b for b, e in zip(sizes.bases, sizes.expert, strict=True) if e), default=0)
    expert = max(sizes.expert, default=0)
    smallest = sizes.resident + max(dense, base + expert)
    if budget < smallest or not expert:
        unit = (f"largest dense layer {human(dense)}" if dense > base + expert else
                f"attention, router and shared experts {human(base)} + one expert "
                f"{human(expert)}")
        raise InvalidArgumentError(
            f"--max-memory {human(budget, up=False)} is below the smallest unit that can run: "
            f"{human(smallest, up=True)} (embeddings/head {human(sizes.resident)} + {unit})",
            f"use --max-memory {human(smallest, up=True).replace(' ', '')} or more")
    group = max(1, (budget - sizes.resident - base) // expert)
    return Plan("stream", f"{head}: largest layer {human(max(sizes.layers))} does not fit, "
                f"experts read {group} at a time", budget, group=int(group), prefetch=False)
