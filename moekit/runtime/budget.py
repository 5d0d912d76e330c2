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

`auto` takes 80% of the free RAM (CPU; bounded by a cgroup v1/v2 memory limit, as in a
container) or VRAM (CUDA): the whole model when it fits there, else streaming within that budget.
Below `resident + largest base + one expert` nothing can run.

This module is the one place that turns free memory into budgets; other shares of it:

    hidden states between layers   <= HIDDEN_FRACTION x free RAM (else a spill file), and on CUDA
                                      <= HIDDEN_FRACTION x free VRAM (else in RAM)
    eval --ref, both models held   <= PAIR_FRACTION x free memory of the device
    calibration working set        <= budget - weights held on the host (`held_weights`;
                                      `layerfit.tokens` sizes its token count by it)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.errors import InvalidArgumentError
from moekit.units import human, parse_size

AUTO_FRACTION = 0.8  # --max-memory auto: this share of the free RAM/VRAM
HIDDEN_FRACTION = 0.25  # hidden states kept in RAM (VRAM) up to this share of the free memory
PAIR_FRACTION = 0.5  # eval --ref holds model and reference together under this share
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2**63
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def free_memory(device: Any) -> float:
    """Free bytes on `device`: VRAM (cuda), or MemAvailable bounded by the cgroup limit (cpu)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    room = cgroup_room()
    return min(host_available(), room) if room is not None else host_available()


def _read_int(path: Path) -> int | None:
    """The integer in a cgroup file; None when absent, unreadable or "max"."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _inactive_file(stat: Path, key: str) -> int:
    """Reclaimable page cache from a cgroup memory.stat (0 when absent)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return 0
    values = {k: v for k, _, v in (line.partition(" ") for line in lines)}
    return int(values[key]) if values.get(key, "").isdigit() else 0


def cgroup_room(root: Path | None = None) -> float | None:
    """Bytes left under this process's cgroup memory limit (v2 `memory.max` - `memory.current`,
    or v1 `memory.limit_in_bytes` - `memory.usage_in_bytes`), counting reclaimable page cache as
    free; None when no limit is set."""
    root = CGROUP_ROOT if root is None else root
    for limit_name, usage_name, stat_key, folder in (
            ("memory.max", "memory.current", "inactive_file", root),
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file",
             root / "memory")):
        limit = _read_int(folder / limit_name)
        if limit is None or limit >= UNLIMITED:
            continue
        usage = _read_int(folder / usage_name) or 0
        usage -= min(usage, _inactive_file(folder / "memory.stat", stat_key))
        return float(max(0, limit - usage))
    return None


def host_available() -> float:
    """MemAvailable of the host (or the free pages when /proc/meminfo cannot be read)."""
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


def budget_bytes(max_memory: str | int | None, device: Any) -> int:
    """The run's weight budget in bytes: `--max-memory` (a size or bytes), or under `auto`
    (or None) AUTO_FRACTION of the free memory of `device` (`free_memory`)."""
    if max_memory in (None, "auto"):
        return int(AUTO_FRACTION * free_memory(device))
    return max_memory if isinstance(max_memory, int) else parse_size(str(max_memory))


def held_weights(sizes: Sizes, budget: int) -> int:
    """Bytes of weights a CPU run holds under `budget`: the whole checkpoint when it fits,
    else resident + the largest layer (streamed, the next layer left to the page cache)."""
    if sizes.total <= budget:
        return sizes.total
    return sizes.resident + max(sizes.layers, default=0)


def header_sizes(checkpoint: Any, itemsize: int) -> Sizes:
    """`Sizes` estimated from the safetensors headers alone (no model built): floating
    tensors at `itemsize` bytes per element, others as stored; a tensor named
    `...layers.<i>....` belongs to decoder layer i, the rest is resident. `bases` and `expert`
    are left empty (only `decide`'s expert groups need them)."""
    layers: dict[int, int] = {}
    total = 0
    for name, info in checkpoint.tensors.items():
        size = info.numel * itemsize if info.dtype in ("F32", "F16", "BF16") else info.nbytes
        total += size
        found = _LAYER.search("." + name)
        if found:
            layers[int(found.group(1))] = layers.get(int(found.group(1)), 0) + size
    ordered = tuple(layers[i] for i in sorted(layers))
    return Sizes(total, total - sum(ordered), ordered, (), ())


def decide(sizes: Sizes, max_memory: str | int | None, device: Any,
           stream: bool | None = None) -> Plan:
    """Memory or streaming, whole layers or expert groups (see the module docstring)."""
    auto = max_memory in (None, "auto")
    budget = budget_bytes(max_memory, device)
    if auto:
        where = f"80% of free {'VRAM' if getattr(device, 'type', '') == 'cuda' else _ram()}"
        label = f"{where} ({human(budget)})"
    else:
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


def _ram() -> str:
    """"RAM", or "RAM under the cgroup limit" when a container's limit is what binds."""
    room = cgroup_room()
    return "RAM under the cgroup limit" if room is not None and room < host_available() else "RAM"


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
    return Plan("stream", f"{head}: embeddings/head {human(sizes.resident)} + largest layer "
                f"{human(max(sizes.layers))} do not fit, experts read {group} at a time",
                budget, group=int(group), prefetch=False)
