"""Reconstruction of a pruned layer's kept experts: all of their projections, fitted together.

The down refit (`compensate`) is linear least squares over the kept experts' down projections;
their gate and up projections stay as trained. After it, the whole kept experts of one layer
(gate/up and down, `gate_up_proj` and `down_proj` of the transformers experts module) are fitted
to the same target, the unpruned layer plus the residual-stream drift y*(t), on the same tokens
x_t with the routing among the kept experts held fixed (ids and gates of `replay.routed`):

    min  sum_t || y*(t) - experts(x_t; ids_t, gates_t; theta) ||^2   over the kept rows of theta,

by Adam on mini-batches of BATCH positions from the down refit's weights (the family's own
expert code computes the outputs and their gradients, so biases, clamps and activations are
exact). It is layer-wise reconstruction, no labels and no gradient through the rest of the
model: each step costs about three forward passes of the kept experts over BATCH positions,
whatever the sample size (more positions cost memory and longer held-out checks, not longer
steps). The last HELD_OUT share of the tokens is never fitted; it is evaluated every
CHECK_EVERY steps, the weights with the lowest held-out error are kept, the fit stops after
PATIENCE checks without a new best or after `steps`, and the layer keeps its down refit alone
when no step beat it. Effort levels (`ops/prune/effort.py`) set `steps` from a budget in
forward passes (`layerfit.compute`: a count, so the output does not depend on the machine's
load) and also stop it when a check gains less than `progress` times what the fit has gained
so far (diminishing returns; off by default). The step size is relative: LEARNING_RATE times
the RMS of each tensor's kept rows (scale-free across models). Runs on the experts module's
own device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moekit.calib.hooks import module_device
from moekit.layerfit.compensate import HELD_OUT
from moekit.surgery.experts import join_halves, split_halves

if TYPE_CHECKING:
    import torch

FITTED = ("gate_up_proj", "down_proj")  # transformers' fused in-memory expert weights
LEARNING_RATE = 2e-3
BATCH = 4096  # positions per Adam step (drawn without replacement, epoch by epoch)
CHECK_EVERY = 50
PATIENCE = 4
STEPS = 1000  # default cap on Adam steps per layer (`prune --reconstruct-steps`)
CHUNK_BYTES = 64 << 20  # float32 expert activations of one chunk of tokens


@dataclass
class Rebuild:
    """Reconstructed rows of kept experts, in the experts module's own layout ({name: {expert:
    row}}, float32), with the held-out errors before (down refit) and after, and steps run."""

    layer: int
    rows: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    held_before: float = 0.0
    held_after: float = 0.0
    steps: int = 0
    best_step: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.rows)


@dataclass
class GateUp:
    """One reconstructed expert's gate and up projections for the writer: `read()` gives
    (gate [I, H], up [I, H]) in float32 (from the spill), `rel_change` ||W - W0|| / ||W0||."""

    read: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    rel_change: float = 0.0


def can_reconstruct(experts: Any) -> bool:
    """The module stores its experts as fused [E, ...] `gate_up_proj` and `down_proj`."""
    num = int(getattr(experts, "num_experts", 0) or 0)
    return num > 0 and all(
        getattr(getattr(experts, name, None), "shape", (0,))[0] == num for name in FITTED)


def reconstruct_layer(layer: int, experts: Any, inputs: torch.Tensor, ids: torch.Tensor,
                      gates: torch.Tensor, target: torch.Tensor, kept: list[int],
                      steps: int = STEPS, *, progress: float = 0.0) -> Rebuild:
    """Fit the kept experts' `gate_up_proj`/`down_proj` rows (module doc) on the first
    (1 - HELD_OUT) of the tokens `inputs` [N, H] routed as (`ids`, `gates`) [N, k] among `kept`,
    towards `target` [N, H]; the module's current weights are the start and stay untouched.
    `progress` (0: off) stops it earlier (module doc)."""
    import torch

    with torch.inference_mode(False), torch.enable_grad():  # the engine runs without autograd
        return _fit(layer, experts, inputs.clone(), ids.clone(), gates.clone(), target.clone(),
                    kept, steps, progress)


def _fit(layer: int, experts: Any, inputs: torch.Tensor, ids: torch.Tensor,
         gates: torch.Tensor, target: torch.Tensor, kept: list[int], steps: int,
         progress: float = 0.0) -> Rebuild:
    import torch

    num = int(inputs.shape[0])
    cut = int(num * (1 - HELD_OUT))
    result = Rebuild(layer)
    if steps <= 0 or cut < 1 or cut >= num or not can_reconstruct(experts):
        return result

    device = module_device(experts)  # the experts' own device (CUDA when the run uses it)
    index = torch.as_tensor(kept, device=device)
    params = {n: p.detach() for n, p in experts.named_parameters(recurse=False)}
    start = {n: params[n][index].float() for n in FITTED}
    delta = {n: torch.zeros_like(start[n], requires_grad=True) for n in FITTED}
    rates = [{"params": [delta[n]], "lr": LEARNING_RATE * float(start[n].pow(2).mean().sqrt())}
             for n in FITTED]
    optimizer = torch.optim.Adam(rates)
    hidden = int(inputs.shape[1])
    width = int(experts.gate_up_proj[0].numel()) // hidden * 3 // 2 + hidden  # floats per pair
    per_chunk = _chunks(0, BATCH, ids.shape[1], width)[0].stop
    held = _chunks(cut, num, ids.shape[1], width)
    view = _kept_only(experts, params, kept, inputs, ids, gates)
    if view is not None:  # the kept experts alone: no copy of all E experts' weights per step
        base, ids, count = view
    else:
        base, count = {n: p.float() for n, p in params.items()}, None  # index_add copies

    def current() -> dict[str, torch.Tensor]:
        """The module's weights with the kept rows moved by delta (one copy per step)."""
        if view is not None:
            return {n: base[n] + delta[n] if n in delta else base[n] for n in base}
        return {n: base[n].index_add(0, index, delta[n]) if n in delta else base[n]
                for n in base}

    def error(weights: dict[str, torch.Tensor], rows: slice | torch.Tensor) -> torch.Tensor:
        with _holding(experts, count):
            got = torch.func.functional_call(experts, weights, (
                inputs[rows].to(device, torch.float32), ids[rows].to(device),
                gates[rows].to(device, torch.float32)))
        return (got - target[rows].to(device)).pow(2).sum()

    def held_error() -> float:
        with torch.no_grad():
            weights = current()
            return sum(float(error(weights, rows)) for rows in held) / (num - cut)

    best = result.held_before = result.held_after = held_error()
    kept_best = {n: d.detach().clone() for n, d in delta.items()}
    shuffle = torch.Generator().manual_seed(layer)
    stale, order, at = 0, torch.randperm(cut, generator=shuffle), 0
    for step in range(1, steps + 1):
        if at + BATCH > cut and at:
            order, at = torch.randperm(cut, generator=shuffle), 0
        batch = order[at:at + BATCH]
        at += BATCH
        optimizer.zero_grad()
        weights = current()
        for part in batch.split(per_chunk):  # the copy's graph is kept for the next chunk
            (error(weights, part) / int(batch.numel())).backward(retain_graph=True)
        del weights
        optimizer.step()
        result.steps = step
        if step % CHECK_EVERY and step != steps:
            continue
        now = held_error()
        if now < best:
            small = now > best - progress * (result.held_before - now)
            best, stale, result.best_step = now, 0, step
            kept_best = {n: d.detach().clone() for n, d in delta.items()}
            if progress > 0 and small:
                break
        else:
            stale += 1
            if stale >= PATIENCE:
                break
    if result.best_step:
        result.held_after = best
        result.rows = {n: {e: (start[n][i] + kept_best[n][i]).cpu() for i, e in enumerate(kept)}
                       for n in FITTED}
    return result


VIEW_CHECK = 64  # positions on which the kept-only module must match the whole one


def _kept_only(experts: Any, params: dict[str, torch.Tensor], kept: list[int],
               inputs: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor, int] | None:
    """The experts module restricted to `kept`: (every per-expert parameter's kept rows and
    the other parameters, float32; `ids` renumbered 0..E'-1; E'), when the module, told it
    holds E' experts, computes the same outputs on the first VIEW_CHECK positions as with all
    E (the family's experts code may depend on E otherwise); else None."""
    import torch

    num = int(experts.num_experts)
    device = next(iter(params.values())).device
    index = torch.as_tensor(kept, device=device)
    local = torch.full((num,), -1, dtype=torch.long)
    local[torch.as_tensor(kept)] = torch.arange(len(kept))
    renumbered = local[ids.long().cpu()].to(ids.dtype)
    if bool((renumbered < 0).any()):
        return None
    sub = {n: (p[index] if p.shape[:1] == (num,) else p).float() for n, p in params.items()}
    rows = slice(0, min(VIEW_CHECK, int(inputs.shape[0])))
    args = (inputs[rows].to(device, torch.float32), gates[rows].to(device, torch.float32))
    try:
        with torch.no_grad():
            whole = torch.func.functional_call(
                experts, {n: p.float() for n, p in params.items()},
                (args[0], ids[rows].to(device), args[1]))
            with _holding(experts, len(kept)):
                mine = torch.func.functional_call(experts, sub,
                                                  (args[0], renumbered[rows].to(device), args[1]))
    except (RuntimeError, IndexError, TypeError, ValueError):  # not this module's shape
        return None
    scale = float(whole.abs().max()) or 1.0
    if mine.shape != whole.shape or float((mine - whole).abs().max()) > 1e-4 * scale:
        return None
    return sub, renumbered, len(kept)


class _holding:
    """Tell the experts module it holds `count` experts (None: leave it), restored on exit."""

    def __init__(self, experts: Any, count: int | None):
        self.experts, self.count, self.saved = experts, count, None

    def __enter__(self) -> None:
        if self.count is not None:
            self.saved = self.experts.num_experts
            self.experts.num_experts = self.count

    def __exit__(self, *exc: object) -> None:
        if self.count is not None:
            self.experts.num_experts = self.saved


def _chunks(begin: int, end: int, k: int, width: int) -> list[slice]:
    size = max(1, CHUNK_BYTES // (4 * max(k, 1) * max(width, 1)))
    return [slice(a, min(end, a + size)) for a in range(begin, end, size)]


def apply_rebuild(experts: Any, rebuild: Rebuild | None) -> dict[str, dict[int, torch.Tensor]]:
    """Write the rebuilt rows into the in-memory module (its dtype); returns the originals for
    `restore_rebuild`."""
    saved: dict[str, dict[int, torch.Tensor]] = {}
    if rebuild is None:
        return saved
    for name, rows in rebuild.rows.items():
        param = getattr(experts, name)
        saved[name] = {}
        for e, row in rows.items():
            saved[name][e] = param.data[e].clone()
            param.data[e] = row.to(param.dtype)
    return saved


def restore_rebuild(experts: Any, saved: dict[str, dict[int, torch.Tensor]]) -> None:
    for name, rows in saved.items():
        param = getattr(experts, name)
        for e, row in rows.items():
            param.data[e] = row


def canonical_gate_up(experts: Any, rows: dict[int, torch.Tensor], interleaved: bool
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{expert: (gate [I, H], up [I, H])} (float32, math orientation y = W x) from fused
    module-layout `gate_up_proj` rows; `interleaved`: gate and up alternate (gpt-oss), else
    gate comes first (`surgery.experts.split_halves`)."""
    transposed = bool(getattr(experts, "is_transposed", False))
    out = {}
    for e, row in rows.items():
        gate, up = split_halves((row.T if transposed else row)[None], interleaved)  # [1, I, H]
        out[e] = (gate[0].contiguous(), up[0].contiguous())
    return out


def apply_gate_up(experts: Any, pairs: dict[int, GateUp], interleaved: bool
                  ) -> dict[str, dict[int, torch.Tensor]]:
    """Set experts' gate/up from canonical pairs (as a candidate holds them) in an in-memory
    module; returns the originals for `restore_rebuild`."""
    transposed = bool(getattr(experts, "is_transposed", False))
    rows = {}
    for e, pair in pairs.items():
        gate, up = pair.read()
        both = join_halves(gate[None], up[None], interleaved)[0]  # [2I, H]
        rows[e] = both.T if transposed else both
    return apply_rebuild(experts, Rebuild(-1, {"gate_up_proj": rows}))


def in_memory_interleaved(layout: Any) -> bool:
    """Whether the experts module holds gate and up alternating: families whose fused on-disk
    tensors load unchanged (gpt-oss); per-expert checkpoints are fused gate-first on load."""
    spec = layout.family.experts
    return bool(spec.fused and spec.interleaved)
