"""`prune --data --effort fast|default|best`: one knob for the calibrated path's cost.

An effort level sets the selection's positions (`--max-tokens`), the beam (`--beam`), the
refit's streamed positions (`--refit-tokens`), the down refit (`--compensate`) and the
whole-expert reconstruction (`--reconstruct-steps`, plus a budget in forward passes and a
progress stop that only effort levels set); an explicit option overrides its part. The
constants follow from what each step needs, not from one model:

- `best`: today's settings, unchanged (32768 positions or fewer to fit the memory, beam 4,
  4 x the positions streamed for the refit and the reconstruction, up to 1000 steps, stopped
  only by held-out patience).
- `default`: as many positions as the search and the down refit need, the larger of
  N = SELECTION_PAIRS E / k (the search ranks every expert by the damage its removal does on
  the positions routed to it: ~4096 routed pairs per expert on average, E experts, k routed
  per token) and N = 20 I E' / (k 3/4) (the down refit well determined: 20 routed pairs per
  fitted parameter of an output row, I per kept expert, E' kept experts, 3/4 of the positions
  fit; docs/prune.md), rounded up to 1024, between 2048 and 32768; beam 2; the refit and
  reconstruction on the selection's own positions (no streamed lanes; the statistics pass
  records the unmodified residuals the refit aims at, `layerfit.reference`, so there is no
  original lane); the reconstruction runs at most the steps whose multiply-adds make
  RECONSTRUCT_FORWARDS forward passes over the positions (`layerfit.compute`: a step count
  fixed before the work from the model's shapes, so the output does not depend on the
  machine's load; at least one held-out check), and stops earlier when a held-out check gains
  less than PROGRESS of what the fit has gained so far. The budget splits the cost target
  (~30 forward passes): the reconstruction 12 forward passes of multiply-adds (it runs at
  ~1.2x a forward's time per multiply-add on a CPU), the rest (statistics pass, capture,
  search, refit, scoring lanes) ~12-15 where the search is narrow (16 experts, top-2).
- `fast`: the anchors' cost, one statistics pass plus one measured pass over a quarter of
  its positions: the statistics of N = 20 I E' / (k 3/4) positions (the down refit's rule
  alone, `refit_positions`) choose the experts with
  STATS_CRITERION (`ean`, with super-expert protection: the stats-only default of `prune`), and
  one layered run over the first REFIT_SHARE of those positions refits the kept experts' down
  projections to absorb the removed ones (`layerfit.compensate`; a layer whose own held-out
  quarter no ridge weight improves keeps its weights). No search, no reconstruction. The
  unmodified model's residuals the refit aims at are recorded by the statistics pass, which
  runs the unmodified model over those positions anyway (`layerfit.reference`, spilled to
  disk), so the layered run has the pruned lane only (no original lane, no second capture,
  no held-out scoring lanes: there is one candidate). It costs about 3 forward passes of its
  own positions (the lane, the capture, the replay of the 2k experts each token can use, the
  refit), ~0.75 of the statistics' positions; the probe behind the estimate runs
  `estimate.FAST_PROBE_POSITIONS` through the first MoE layer only. In all ~2-2.5 forward
  passes over the statistics' positions once the model is open.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moekit.errors import InvalidArgumentError
from moekit.families.registry import first_value

EFFORTS = ("fast", "default", "best")
DEFAULT_EFFORT = "default"
MIN_POSITIONS, MAX_POSITIONS = 2048, 32768  # as `layerfit.tokens` MIN_TOKENS, PRUNE_TOKENS
PAIRS_PER_PARAMETER = 20  # routed (token, expert) pairs per fitted parameter of a down row
SELECTION_PAIRS = 4096  # routed pairs per expert (on average) the search ranks experts on
FIT_SHARE = 0.75  # the rest of the positions choose the ridge strength
RECONSTRUCT_FORWARDS = 12.0  # the reconstruction's multiply-adds, in forward passes
PROGRESS = 0.01  # stop when a check gains less than this share of the gain so far
BEST_STEPS = 1000  # as `layerfit.reconstruct.STEPS`
STATS_CRITERION = "ean"  # `fast`'s selection (the stats-only default)
REFIT_SHARE = 0.25  # `fast`'s measured pass: this share of the statistics' positions


@dataclass(frozen=True)
class EffortSettings:
    """What an effort level sets. `max_tokens` None: the memory-adaptive 32768 default;
    `refit_auto`: stream REFIT_FACTOR x the positions for the refit when the memory allows;
    `compensate` None: with and without the down refit, the better kept;
    `reconstruct_forwards` None: no budget beyond the step count; `reconstruct_progress` 0:
    no progress stop; `selection` a stats criterion: the experts are chosen by it and the
    measured pass only refits them, on `refit_share` of the positions (None: the search on
    all of them)."""

    name: str
    max_tokens: int | None
    beam: int
    refit_auto: bool
    compensate: bool | None
    reconstruct_steps: int
    reconstruct_forwards: float | None = None
    reconstruct_progress: float = 0.0
    selection: str | None = None
    refit_share: float = 1.0


def _round_positions(value: float) -> int:
    """Up to a multiple of 1024, within [MIN_POSITIONS, MAX_POSITIONS]."""
    return int(min(MAX_POSITIONS, max(MIN_POSITIONS, math.ceil(value / 1024) * 1024)))


def _shape(layout: Any, n_drop: int) -> tuple[int, int, int, int]:
    """(experts E, kept E', top-k, expert width I) of the first MoE layer."""
    num = layout.moe_layers[0].num_experts
    hidden = int(first_value(layout.config, ("hidden_size", "d_model", "n_embd")))
    width = int(first_value(layout.config, layout.family.keys.expert_width, hidden) or hidden)
    return num, num - n_drop, max(1, layout.top_k()), width


def refit_positions(layout: Any, n_drop: int) -> int:
    """`fast`'s positions: the down refit well determined (module docstring)."""
    _, kept, k, width = _shape(layout, n_drop)
    return _round_positions(PAIRS_PER_PARAMETER * width * kept / (k * FIT_SHARE))


def search_positions(layout: Any, n_drop: int) -> int:
    """`default`'s positions: what the search and the down refit need (module docstring)."""
    num, _, k, _ = _shape(layout, n_drop)
    return max(refit_positions(layout, n_drop), _round_positions(SELECTION_PAIRS * num / k))


def effort_settings(effort: str, layout: Any, n_drop: int) -> EffortSettings:
    """The settings of `effort` for this model and removal count (module docstring)."""
    if effort == "best":
        return EffortSettings("best", None, 4, True, None, BEST_STEPS)
    if effort == "default":
        return EffortSettings("default", search_positions(layout, n_drop), 2, False, None,
                              BEST_STEPS, RECONSTRUCT_FORWARDS, PROGRESS)
    if effort == "fast":
        return EffortSettings("fast", refit_positions(layout, n_drop), 1, False, True, 0,
                              selection=STATS_CRITERION, refit_share=REFIT_SHARE)
    raise InvalidArgumentError(f"unknown --effort '{effort}'", f"use one of {', '.join(EFFORTS)}")


def apply_effort(options: Any, layout: Any, n_drop: int) -> tuple[EffortSettings, Any]:
    """The level's settings, and `options` (`calibrated.DataOptions`) with what the level
    sets filled where the user left it unset (None): a new record, `options` is left as is."""
    found = effort_settings(options.effort, layout, n_drop)
    changes: dict[str, Any] = {}
    if options.max_tokens is None and found.max_tokens is not None:
        changes["token_default"] = found.max_tokens
    if options.beam is None:
        changes["beam"] = found.beam
    if options.compensate is None and options.width is None:
        changes["compensate"] = found.compensate
    if options.reconstruct_steps is None:
        changes.update(reconstruct_steps=found.reconstruct_steps,
                       reconstruct_forwards=found.reconstruct_forwards,
                       reconstruct_progress=found.reconstruct_progress)
    if options.refit_tokens is None and options.refit_auto:
        changes["refit_auto"] = found.refit_auto
    resolved = dataclasses.replace(options, **changes)
    if found.selection is not None and resolved.beam == found.beam and \
            resolved.compensate is True and resolved.width is None and \
            resolved.router is False and not resolved.reconstruct_steps:
        resolved = dataclasses.replace(resolved, selection=found.selection,
                                       refit_share=found.refit_share)
    return found, resolved


def described(settings: EffortSettings, options: Any) -> str:
    """One line: the level and the settings the run uses."""
    tokens = options.max_tokens or options.token_default or "32768 (memory-adaptive)"
    refit = options.refit_tokens or ("4x streamed" if options.refit_auto else "the selection's")
    steps = options.reconstruct_steps
    limit = (f" (a budget of {options.reconstruct_forwards:g} forward passes), stopped "
             f"earlier at <{options.reconstruct_progress:.0%} held-out progress"
             if steps and options.reconstruct_forwards else "")
    fit = {None: "tried", True: "on", False: "off"}[options.compensate]
    if getattr(options, "selection", None):
        return (f"effort {settings.name}: '{options.selection}' on the statistics of {tokens} "
                f"positions, down refit on the first {options.refit_share:.0%} of them, no "
                "search, no reconstruction")
    return (f"effort {settings.name}: {tokens} positions, beam {options.beam}, down refit "
            f"{fit}, refit positions {refit}, reconstruction up to {steps} steps per layer{limit}")

