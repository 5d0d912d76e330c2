"""Ablation importance of every (MoE layer, expert) on a bounded token sample.

`sample_batches` takes the first windows of every domain (an equal share of `tokens` each);
`ablate` runs them through an in-memory model and returns per (layer, expert, domain) sums
of the exact NLL change and KL (`exact`) and of the first-order NLL estimate
(`first_order`), with the number of predicted positions per domain. Means are sums / tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moekit.calib.capture import moe_blocks
from moekit.calib.data import Domain, batches
from moekit.errors import InvalidArgumentError, UnsupportedModelError
from moekit.ops.ablation.exact import exact_layer, layer_inputs
from moekit.ops.ablation.first_order import first_order_batch
from moekit.ops.ablation.variants import layer_routing
from moekit.runtime.distributed import dist_context
from moekit.stats.ablation import METHODS, AblationSums, ablation_frame

if TYPE_CHECKING:
    import torch

    from moekit.calib.data import Domain
    from moekit.families.layout import ModelLayout

Progress = Callable[[str, int, int], None]  # (what, step done, steps in all)


def sample_batches(domains: list[Domain], tokens: int, batch_size: int
                   ) -> list[tuple[int, torch.Tensor]]:
    """(domain index, ids [B, S]) covering the first ceil(tokens / D) tokens (whole windows,
    at least one) of every domain."""
    if tokens < 2:
        raise InvalidArgumentError(f"--ablation-tokens must be at least 2, got {tokens}")
    share = math.ceil(tokens / max(1, len(domains)))
    out = []
    for index, domain in enumerate(domains):
        taken, seen = [], 0
        for window in domain.windows:
            if seen >= share:
                break
            taken.append(window)
            seen += int(window.numel())
        part = Domain(domain.name, domain.sha256, domain.files, taken)
        out += [(index, batch) for batch in batches(part, batch_size)]
    return out


def check_ablatable(layout: ModelLayout) -> None:
    """Fail early for routers that `calib.routing.route` cannot replay."""
    try:
        layer_routing(layout, 0)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"--ablation: {err.message}",
                                    "profile without --ablation") from err


def ablate(model: Any, layout: ModelLayout, work: list[tuple[int, torch.Tensor]],
           domains: list[str], *, exact: bool = True, first_order: bool = True,
           progress: Progress | None = None) -> AblationSums:
    """Ablation sums of every MoE layer and expert of the in-memory `model` on `work`."""
    run = _Run(model, layout, domains, progress,
               len(work) * (int(exact) * len(layout.moe_layers) + int(first_order)))
    for domain, batch in work:
        ids = batch.to(run.device)
        inputs, base = run.plain(ids, domain)
        if exact:
            run.exact(ids, inputs, base, domain)
        if first_order:
            run.first_order(ids, domain)
    sums = run.sums
    sums.seconds = run.timer
    if not exact:
        sums.loss, sums.kl = {}, {}
    if not first_order:
        sums.first_order = {}
    return sums


class _Run:
    """The state of one `ablate` call: blocks, routings, sums, timers, progress."""

    def __init__(self, model: Any, layout: ModelLayout, domains: list[str],
                 progress: Progress | None, steps: int):
        import numpy as np

        self.model, self.progress, self.steps, self.done = model, progress, steps, 0
        self.blocks = moe_blocks(model, layout.family)
        self.routings = [layer_routing(layout, i) for i in range(len(self.blocks))]
        self.widths = [int(getattr(b.experts, "num_experts", 0) or
                           layout.moe_layers[i].num_experts) for i, b in enumerate(self.blocks)]
        self.sums = AblationSums([b.layer for b in self.blocks], domains,
                                 np.zeros(len(domains), np.int64), np.zeros(len(domains)))
        for block, width in zip(self.blocks, self.widths, strict=True):
            for name in ("loss", "kl", "first_order"):
                getattr(self.sums, name)[block.layer] = np.zeros((width, len(domains)))
        self.device = next(model.parameters()).device
        self.logits_index = layout.family.router.logits_index
        self.timer = {"plain": 0.0, "exact": 0.0, "first_order": 0.0}

    def plain(self, ids: torch.Tensor, domain: int) -> tuple[dict, torch.Tensor]:
        """One plain forward: MoE layer inputs and the log-probabilities [B, S-1, V]."""
        import time

        import torch

        start = time.perf_counter()
        with torch.inference_mode():
            inputs, logits = layer_inputs(self.model, self.blocks, ids)
            base = logits[:, :-1].float().log_softmax(-1)
            nll = -base.gather(-1, ids[:, 1:].unsqueeze(-1))
        self.sums.tokens[domain] += int(nll.numel())
        self.sums.base_loss[domain] += float(nll.double().sum())
        self.timer["plain"] += time.perf_counter() - start
        return inputs, base

    def exact(self, ids: torch.Tensor, inputs: dict, base: torch.Tensor, domain: int) -> None:
        import time

        import numpy as np
        import torch

        start = time.perf_counter()
        for block, routing, width in zip(self.blocks, self.routings, self.widths, strict=True):
            variants = list(range(width)) + ([-1] if routing.n_group > 1 else [])
            with torch.inference_mode():
                loss, kl = exact_layer(self.model, block, routing, self.logits_index,
                                       inputs[block.layer], ids, base, variants)
            self.sums.loss[block.layer][:, domain] += loss[:width].numpy()
            self.sums.kl[block.layer][:, domain] += kl[:width].numpy()
            if len(variants) > width:
                lift = self.sums.group_lift.setdefault(block.layer, np.zeros(len(
                    self.sums.domains)))
                lift[domain] += float(loss[width])
            self._step("exact")
        self.timer["exact"] += time.perf_counter() - start

    def first_order(self, ids: torch.Tensor, domain: int) -> None:
        import time

        start = time.perf_counter()
        values = first_order_batch(self.model, self.blocks, self.routings, self.logits_index,
                                   ids)
        for block, value in zip(self.blocks, values, strict=True):
            self.sums.first_order[block.layer][:, domain] += value.numpy()
        self.timer["first_order"] += time.perf_counter() - start
        self._step("first-order")

    def _step(self, what: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(what, self.done, self.steps)


def check_request(layout: ModelLayout, method: str, tokens: int) -> None:
    """Refuse bad ablation settings before anything is loaded."""
    if method not in METHODS:
        raise InvalidArgumentError(f"--ablation-method {method} is not one of "
                                   f"{', '.join(METHODS)}")
    if tokens < 2:
        raise InvalidArgumentError(f"--ablation-tokens must be at least 2, got {tokens}")
    check_ablatable(layout)


def check_engine(engine: Any) -> None:
    """Ablation runs on an in-memory model in one process (see docs/profile.md)."""
    if engine.mode != "memory":
        raise InvalidArgumentError(
            "--ablation needs the whole model in memory, but it is streamed layer by layer "
            "under --max-memory (each layer's variants would re-read every later layer)",
            "raise --max-memory (or use a larger device), or profile without --ablation")
    if dist_context().world_size > 1:
        raise InvalidArgumentError("--ablation runs in one process, not under torchrun",
                                   "run the ablation profile without torchrun")


def profile_ablation(engine: Any, layout: ModelLayout, domains: list[Domain], *, tokens: int,
                     batch_size: int, method: str,
                     progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    """(`stats.ablation.ablation_frame` rows, metadata) of an ablation run on the first
    `tokens` tokens of `domains`."""
    work = sample_batches(domains, tokens, batch_size)
    sums = ablate(engine.model, layout, work, [d.name for d in domains],
                  exact=method != "first-order", first_order=method != "exact",
                  progress=progress)
    plain = sums.seconds.get("plain", 0.0)
    info = {"method": method, "tokens_requested": tokens,
            "tokens": int(sums.tokens.sum()), "windows": sum(int(b.shape[0]) for _, b in work),
            "base_loss": {d: (float(sums.base_loss[i] / sums.tokens[i]) if sums.tokens[i]
                              else None) for i, d in enumerate(sums.domains)},
            "seconds": {k: round(v, 3) for k, v in sums.seconds.items()},
            "cost_vs_plain_forward": {k: round(v / plain, 2) for k, v in sums.seconds.items()
                                      if plain > 0 and k != "plain"},
            "group_routing": "plain top-k in the ablated layer when groups cannot stay balanced",
            "group_lift_loss": {str(layer): float(value.sum() / max(1, sums.tokens.sum()))
                                for layer, value in sums.group_lift.items()}}
    return ablation_frame(sums), info
