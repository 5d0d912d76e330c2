"""Expert tensors made from a dense SwiGLU FFN, produced lazily one tensor at a time.

Dense FFN: y = W_down (silu(W_gate x) * (W_up x)), W_gate, W_up [I, H], W_down [H, I]; neuron n
is row n of W_gate/W_up and column n of W_down.

- copy: every expert is the dense FFN.
- split: the I neurons (minus the shared ones) are partitioned into E experts of width I/E;
  expert j keeps rows S_j of W_gate/W_up and columns S_j of W_down.
- drop: a copy in which a fraction r of each expert's neurons (its own seeded set) is
  re-drawn from N(mean, std) of the dense matrix (Drop-Upcycling, Nakamura et al. 2025).

Only W_down is ever scaled (by `routed_scale` / `shared_scale`): the FFN is linear in W_down, so
that keeps function preservation exact where it holds (see `moekit.ops.upcycle.scales`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moekit.io.dtypes import to_torch
from moekit.io.reader import Checkpoint, TensorInfo

if TYPE_CHECKING:
    import torch

ROLES = ("gate", "up", "down")


def seed_of(*parts: object) -> int:
    """A 63-bit seed derived from `parts` (stable across runs and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: object) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(seed_of(*parts))


@dataclass(frozen=True)
class Recipe:
    """How experts are made. `groups[layer]` is [E, I/E] neuron ids (split) and
    `shared[layer]` the shared expert's neuron ids (split with a shared expert)."""

    method: str
    experts: int
    routed_scale: float
    shared_scale: float
    drop_ratio: float
    seed: int
    groups: dict[int, torch.Tensor] | None = None
    shared: dict[int, torch.Tensor] | None = None

    def is_plain_copy(self, role: str, shared: bool = False) -> bool:
        """True when the tensor is the dense tensor byte for byte (no torch work needed)."""
        if shared:
            return (self.shared is None) and (role != "down" or self.shared_scale == 1.0)
        return self.method == "copy" and (role != "down" or self.routed_scale == 1.0)


class DenseFfn:
    """Serves the dense FFN tensors of the current layer, read once, and results derived from
    them (a scaled copy shared by all experts). Holding one layer bounds memory to about
    3 dense FFN matrices plus one derived tensor per role."""

    def __init__(self, checkpoint: Checkpoint, keys: dict[int, dict[str, str]],
                 consumed: set[str]):
        self.checkpoint = checkpoint
        self.keys = keys
        self.consumed = consumed
        self._layer: int | None = None
        self._cache: dict[object, Any] = {}

    def _enter(self, layer: int) -> None:
        if layer != self._layer:
            self._cache.clear()
            self._layer = layer

    def get(self, layer: int, role: str) -> torch.Tensor:
        """The dense `role` matrix of `layer` ([I, H] for gate/up, [H, I] for down)."""
        self._enter(layer)
        if role not in self._cache:
            name = self.keys[layer][role]
            self._cache[role] = read_tensor(self.checkpoint.tensors[name])
            self.consumed.add(name)
        return self._cache[role]

    def derived(self, layer: int, key: object, build: Callable[[], Any]) -> Any:
        """`build()` once per layer for `key`, then the cached result."""
        self._enter(layer)
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor read with plain file I/O into private memory (no mmap: mapped pages of the
    whole source would stay resident and count towards RSS)."""
    import torch

    buffer = bytearray(info.nbytes)
    with open(info.shard, "rb", buffering=0) as handle:
        handle.seek(info.start)
        view, done = memoryview(buffer), 0
        while done < info.nbytes:
            count = handle.readinto(view[done:])
            if not count:
                raise OSError(f"{info.shard.name} ended while reading '{info.name}'")
            done += count
    if not info.nbytes:
        return torch.empty(info.shape, dtype=to_torch(info.dtype))
    return torch.frombuffer(buffer, dtype=to_torch(info.dtype)).reshape(info.shape)


def scaled(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """weight * scale, computed in float32 and returned in weight's dtype."""
    if scale == 1.0:
        return weight
    import torch

    return (weight.to(torch.float32) * scale).to(weight.dtype)


def select(weight: torch.Tensor, role: str, neurons: torch.Tensor) -> torch.Tensor:
    """Neurons `neurons` of a dense matrix: rows of gate/up, columns of down (contiguous)."""
    axis = 1 if role == "down" else 0
    return weight.index_select(axis, neurons).contiguous()


def dropped_neurons(recipe: Recipe, layer: int, expert: int, width: int) -> torch.Tensor:
    """The round(r * I) neuron ids of `expert` re-initialised by drop (its own seeded set,
    shared by its gate, up and down matrices)."""
    import torch

    count = round(recipe.drop_ratio * width)
    perm = torch.randperm(width, generator=generator(recipe.seed, layer, expert, "drop"))
    return perm[:count].sort().values


def drop_reinit(weight: torch.Tensor, role: str, neurons: torch.Tensor,
                gen: torch.Generator, stats: tuple[float, float]) -> torch.Tensor:
    """A copy of `weight` whose `neurons` are redrawn from N(mean, std) (`stats` of the
    whole dense matrix)."""
    import torch

    mean, std = stats
    out = weight.clone()
    if role == "down":
        noise = torch.randn((out.shape[0], len(neurons)), generator=gen) * std + mean
        out[:, neurons] = noise.to(out.dtype)
    else:
        noise = torch.randn((len(neurons), out.shape[1]), generator=gen) * std + mean
        out[neurons, :] = noise.to(out.dtype)
    return out


def matrix_stats(weight: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of a matrix, computed in float32."""
    import torch

    full = weight.to(torch.float32)
    return full.mean().item(), full.std().item()


def expert_producer(ffn: DenseFfn, recipe: Recipe, layer: int, expert: int,
                    role: str) -> Callable[[], torch.Tensor]:
    """A callable building one routed expert matrix on demand."""
    scale = recipe.routed_scale if role == "down" else 1.0

    def produce() -> torch.Tensor:
        dense = ffn.get(layer, role)
        if recipe.method == "split":
            assert recipe.groups is not None
            return scaled(select(dense, role, recipe.groups[layer][expert]), scale)
        if recipe.method == "drop":
            width = dense.shape[1 if role == "down" else 0]
            neurons = dropped_neurons(recipe, layer, expert, width)
            gen = generator(recipe.seed, layer, expert, role)
            stats = ffn.derived(layer, ("stats", role), lambda: matrix_stats(dense))
            return scaled(drop_reinit(dense, role, neurons, gen, stats), scale)
        return ffn.derived(layer, ("copy", role), lambda: scaled(dense, scale))

    return produce


def shared_producer(ffn: DenseFfn, recipe: Recipe, layer: int,
                    role: str) -> Callable[[], torch.Tensor]:
    """A callable building one shared-expert matrix: the shared neurons (split) or the whole
    dense matrix (copy, drop), W_down times `shared_scale`."""
    scale = recipe.shared_scale if role == "down" else 1.0

    def produce() -> torch.Tensor:
        dense = ffn.get(layer, role)
        if recipe.shared is not None:
            return scaled(select(dense, role, recipe.shared[layer]), scale)
        return scaled(dense, scale)

    return produce


def split_groups(width: int, experts: int, shared: int, order: str, seed: int,
                 layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neuron partition for `contiguous` / `random` orders: (groups [E, (I-N)/E], shared [N]).
    Contiguous gives the shared expert neurons 0..N-1 and expert j the next block j; random
    does the same on a seeded permutation. Ids are sorted inside each group."""
    import torch

    if order == "random":
        perm = torch.randperm(width, generator=generator(seed, layer, "split"))
    else:
        perm = torch.arange(width)
    groups = perm[shared:].reshape(experts, -1).sort(dim=1).values
    return groups, perm[:shared].sort().values
