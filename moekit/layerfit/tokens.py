"""The default calibration token count of `prune --data` (PRUNE_TOKENS positions) and `merge
--data` (DEFAULT_TOKENS), fewer when their per-layer working set would not fit beside the weights.
PRUNE_TOKENS is twice the merge's because 32768 positions lowered the calibrated prune's loss
over 16384 on 16 of 17 (model, calibration sample) pairs at 50 % (docs/benchmarks.md, "default
raised to 32768"); for the merge the same comparison was mixed (3 better, 2 worse).

Per calibration position, one MoE layer's selection and refit hold about (bytes; H hidden, E
experts, k top-k, I expert width, s the run dtype's itemsize, M = the experts a token can be
re-routed to: k + n_drop, or E under grouped/biased-softmax routing, `replay.cached_candidates`)

    captures  3 H s + 8 E                       block inputs and residuals, router logits
    replay    4 H + 16 E + 8 M^2 + 16 M         y_E, Gram matrices and cross terms (M <= 64)
              4 H + 16 E + M H s                the expert outputs themselves (M > 64)
    refit     k H s + 4 k I + 4 H + 11 k H + 3 H    inputs per routed pair, h_e, targets, the
                                                 Gauss-Seidel residuals and one expert's block

The memory left for them is the run's budget minus the weights it holds, both from `runtime.budget`:
`--max-memory` (or `AUTO_FRACTION` of the free RAM under `auto`, `budget_bytes`) minus the
checkpoint (in memory) or minus embeddings + head + the largest layer (streamed; `held_weights` of
the headers' `header_sizes`). The default is the largest multiple of 1024 positions, at most the
command's default and at least MIN_TOKENS, that fits. An explicit `--max-tokens` is always used as
given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.calib.routing import Routing
from moekit.errors import UnsupportedModelError
from moekit.families.registry import first_value
from moekit.io.reader import Checkpoint
from moekit.layerfit.reconstruct import CHUNK_BYTES as RECONSTRUCT_CHUNK
from moekit.layerfit.refit_stats import PAIR_BYTES
from moekit.layerfit.refit_stream import REFIT_BYTES
from moekit.layerfit.replay import CHUNK_BYTES, EXPERT_BYTES, gram_fits
from moekit.runtime.budget import budget_bytes, header_sizes, held_weights
from moekit.runtime.loading import held_itemsize
from moekit.units import human

DEFAULT_TOKENS = 16384
PRUNE_TOKENS = 32768
MIN_TOKENS = 2048
REFIT_FACTOR = 4  # `prune --data` streams this many times the selection's positions to refit


@dataclass(frozen=True)
class TokenBudget:
    """The chosen count, the estimated bytes per position, the memory they may use, the
    command's default and the bytes taken first whatever the count."""

    tokens: int
    per_token: int
    allowance: int
    default: int = DEFAULT_TOKENS
    fixed: int = 0

    def note(self) -> str | None:
        """One line when the default was lowered, else None."""
        if self.tokens >= self.default:
            return None
        fixed = f" plus {human(self.fixed)} whatever the count" if self.fixed else ""
        return (f"calibration: {self.tokens} token positions, not the default "
                f"{self.default}: about {human(self.per_token)} each per layer{fixed}, "
                f"{human(max(self.allowance, 0))} left beside the weights (--max-tokens N to "
                "choose; a larger --max-memory to allow more)")


def _dims(layout: Any) -> tuple[int, int]:
    """(hidden size H, routed expert width I) from the config."""
    hidden = int(first_value(layout.config, ("hidden_size", "d_model", "n_embd")))
    width = int(first_value(layout.config, layout.family.keys.expert_width, hidden) or hidden)
    return hidden, width


def per_token_bytes(layout: Any, n_drop: int, itemsize: int, selection_bias: bool) -> int:
    """The estimate of the module docstring for the first MoE layer of `layout` (0 when its
    routing cannot be replayed: no calibrated selection runs)."""
    config = layout.config
    hidden, width = _dims(layout)
    experts = layout.moe_layers[0].num_experts
    k = layout.top_k()
    try:
        routing = Routing.of(layout.family, config)
    except UnsupportedModelError:  # not replayable: the command refuses it later, in its words
        return 0
    stable = routing.n_group <= 1 and (routing.scoring == "sigmoid" or not selection_bias)
    m = min(experts, k + n_drop) if stable else experts
    captures = 3 * hidden * itemsize + 8 * experts
    cached = 8 * m * m + 16 * m if gram_fits(m, hidden) else m * hidden * itemsize
    replay = 4 * hidden + 16 * experts + cached
    refit = k * hidden * itemsize + 4 * k * width + 4 * hidden + 11 * k * hidden + 3 * hidden
    return int(captures + replay + refit)


def experts_call_bytes(layout: Any, itemsize: int) -> int:
    """The transient of one experts call of the selection's cache (`replay.expert_outputs`,
    whatever the token count): n·M = EXPERT_BYTES / (4 H) rows of repeated inputs and outputs
    [., H] and gate/up, activated and gated intermediates [., 4 I] in the run dtype, beside a
    float64 reduction chunk and its product (2 CHUNK_BYTES)."""
    hidden, width = _dims(layout)
    rows = EXPERT_BYTES // (4 * hidden)
    return rows * itemsize * (2 * hidden + 4 * width) + 2 * CHUNK_BYTES


def refit_sum_bytes(layout: Any, n_drop: int) -> int:
    """Memory of `prune --refit-tokens`'s streamed sums for one MoE layer, whatever the token
    count (`refit_stats`: float64 A_e [I, I] and C_e [H, I] of the fit and held-out tokens per
    kept expert, the pair Grams B_ef up to PAIR_BYTES, one chunk of REFIT_BYTES)."""
    hidden, width = _dims(layout)
    kept = layout.moe_layers[0].num_experts - n_drop
    pairs = min(PAIR_BYTES, kept * (kept - 1) // 2 * 2 * 8 * width * width)
    return 2 * kept * (width * width + hidden * width) * 8 + pairs + REFIT_BYTES


def reconstruct_bytes(layout: Any, n_drop: int, streamed: int = 0) -> int:
    """Memory of the whole-expert reconstruction of one MoE layer, whatever the selection's
    token count (`reconstruct`: float32 copies of every expert's gate/up/down [E, 3 H I] twice
    (the module's and the step's weights), start, delta, gradient and two Adam moments of the
    kept ones,
    autograd activations of one chunk, about 3 x CHUNK_BYTES); with `streamed` refit positions
    (`--refit-tokens`), their inputs, targets and routing [N, 2 H + 2 k] too."""
    hidden, width = _dims(layout)
    num = layout.moe_layers[0].num_experts
    sample = 4 * streamed * (2 * hidden + 2 * layout.top_k())
    return 4 * 3 * hidden * width * (2 * num + 5 * (num - n_drop)) + 3 * RECONSTRUCT_CHUNK + sample


def calibration_tokens(source: Path, layout: Any, *, n_drop: int, dtype: str = "auto",
                       device: str = "cpu", max_memory: str | int | None = "auto",
                       requested: int | None = None, default: int = DEFAULT_TOKENS,
                       fixed: int = 0, experts_call: bool = False) -> TokenBudget:
    """`requested` when given, else `default` or fewer (module docstring); `fixed` bytes (e.g.
    `refit_sum_bytes`), and with `experts_call` the selection's `experts_call_bytes`, are taken
    from the memory first (`TokenBudget.fixed` holds their sum)."""
    checkpoint = Checkpoint(Path(source))
    itemsize = held_itemsize(checkpoint, dtype, device)
    bias = bool(layout.moe_layers[0].selection_bias)
    per = per_token_bytes(layout, n_drop, itemsize, bias)
    allowance = _allowance(checkpoint, device, max_memory, itemsize)
    if experts_call:
        fixed += experts_call_bytes(layout, itemsize)
    if requested is not None or per == 0:
        return TokenBudget(int(requested or default), per, allowance, default, fixed)
    fits = (max(allowance - fixed, 0) // per) // 1024 * 1024
    return TokenBudget(int(min(default, max(MIN_TOKENS, fits))), per, allowance, default, fixed)


def _allowance(checkpoint: Any, device: str, max_memory: str | int | None,
               itemsize: int) -> int:
    """Bytes of RAM left for calibration (module docstring; `runtime.budget`): the RAM
    budget less the weights a CPU run holds under it; weights on a GPU take none."""
    if device not in ("cpu", "auto") or (device == "auto" and _has_cuda()):
        return budget_bytes("auto", "cpu")
    budget = budget_bytes(max_memory, "cpu")
    return budget - held_weights(header_sizes(checkpoint, itemsize), budget)


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())
