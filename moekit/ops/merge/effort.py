"""`merge --effort fast|default|best`: one knob for the calibrated merge's cost.

The default merge (`m-smoe` grouping, `fit-layer`) makes, over its N calibration positions
(`--max-tokens`, the memory-aware 16384 default of `layerfit.tokens`):

    statistics   one `profile` pass over N (without `--stats`: usage, centres, super experts)
    measured run one layered run (`onepass.py`): the grouping sample (N positions through the
                 unmodified model, its router logits captured), the fit lanes `original` and
                 `pruned` (N each, both captured for the refit), the held-out lanes
                 `reference`, `centres`, `refitted` (N/4 each: a fifth of the windows read),
                 and each layer's down refit

so about 1 + (1 + 2 + 3 / 4) = 4.75 plain forward passes over N plus the captures, the replay
and the refit. An effort level changes only how many positions each part sees (same grouping,
same method, same end-to-end check); an explicit `--max-tokens` / `--refit-tokens` sets its
part. The numbers follow from what each part needs, not from one model:

- `default`: today's merge, unchanged (the same written bytes and provenance).
- `fast`: towards the anchors' cost, statistics plus one measured run on a share of the
  positions: the statistics on the default's N positions (the same centres as `default`, they
  come from the same pass), the measured run on REFIT_SHARE = 1/4 of them. Its lanes are ~3.75
  forward passes of its own positions (above), so ~1 pass over N; on CPU its captures, replay
  and refit add as much again and more (fixture: 4-5 plain forward passes over N in all, the
  statistics pass ~1 of them; docs/benchmarks.md).
- `best`: the refit's streamed positions raised to REFIT_FACTOR x N (as `prune --data
  --effort best` streams them, `layerfit.refit_stream`) when their sums fit beside the weights,
  the rest as `default`: the down refit of a merged layer has I parameters per output row of
  each of its E' experts, and 20 routed (token, expert) pairs per parameter need
  20 I E' / (k 3/4) positions (the rule of `prune --data --effort default`, docs/prune.md:
  20480 on the fixture at 25 %, more than the default's 16384), which REFIT_FACTOR x N covers
  for models up to 4x that size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.errors import InvalidArgumentError
from moekit.layerfit.tokens import REFIT_FACTOR, calibration_tokens, refit_sum_bytes
from moekit.units import human

EFFORTS = ("fast", "default", "best")  # the names of `prune --data --effort`
DEFAULT_EFFORT = "default"
REFIT_SHARE = 0.25  # `fast`: the measured run on this share of the statistics' positions


@dataclass(frozen=True)
class MergeEffort:
    """What a level sets, as shares of the merge's N positions: `measured_share` of them run
    through the measured run (grouping sample and refit lanes; the statistics pass keeps N);
    `refit_factor` x the measured positions are streamed for the down refit (1: none)."""

    name: str
    measured_share: float = 1.0
    refit_factor: int = 1


@dataclass(frozen=True)
class MergeTokens:
    """The positions of each part: the statistics pass, the measured run (`--max-tokens` of the
    grouping and refit), the streamed refit (None: the measured run's own)."""

    statistics: int
    measured: int
    refit: int | None = None

    def describe(self) -> str:
        refit = f", down refit on {self.refit} streamed" if self.refit else ""
        return (f"statistics on {self.statistics} positions, grouping and refit on "
                f"{self.measured}{refit}")


def effort_settings(effort: str) -> MergeEffort:
    """The settings of `effort` (module docstring)."""
    if effort == "default":
        return MergeEffort("default")
    if effort == "fast":
        return MergeEffort("fast", measured_share=REFIT_SHARE)
    if effort == "best":
        return MergeEffort("best", refit_factor=REFIT_FACTOR)
    raise InvalidArgumentError(f"unknown --effort '{effort}'", f"use one of {', '.join(EFFORTS)}")


def check_effort(effort: str) -> None:
    """`--effort` names a level (checked before any work)."""
    effort_settings(effort)


def resolve_tokens(effort: str, positions: int, *, refit_tokens: int | None = None,
                   refit_fits: bool = True) -> MergeTokens:
    """The positions of each part for `effort` on the run's N = `positions` (`--max-tokens` or
    the memory-aware default). `fast`'s measured run: the first quarter of N (rounded up).
    An explicit `refit_tokens` is used as given (all levels); `best`'s own only when
    `refit_fits` (its sums fit beside the weights). A streamed count not above the measured
    run's positions streams nothing (None)."""
    found = effort_settings(effort)
    measured = math.ceil(positions * found.measured_share)
    refit = refit_tokens
    if refit is None and found.refit_factor > 1 and refit_fits:
        refit = found.refit_factor * measured
    return MergeTokens(positions, measured, refit if refit and refit > measured else None)


def refit_fits(source: Path, layout: Any, n_drop: int, measured: int, *, dtype: str,
               device: str, max_memory: str | int | None) -> tuple[bool, str | None]:
    """Do `best`'s streamed refit sums (`layerfit.tokens.refit_sum_bytes`, whatever the count)
    leave the measured run's `measured` positions room beside the weights? (as `prune --data
    --effort best` decides) With a line saying why not."""
    fixed = refit_sum_bytes(layout, n_drop)
    found = calibration_tokens(source, layout, n_drop=n_drop, dtype=dtype, device=device,
                               max_memory=max_memory, requested=measured, fixed=fixed)
    if found.fixed + measured * found.per_token <= found.allowance:
        return True, None
    return False, (f"effort best: the down refit on the measured run's {measured} positions "
                   f"only: streaming {REFIT_FACTOR}x would need {human(fixed)} per MoE layer "
                   "beside the weights (allow more with --max-memory, or set --refit-tokens)")
