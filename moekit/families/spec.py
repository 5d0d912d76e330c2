"""Declarative records that describe where a model family keeps its MoE pieces.

Templates are relative to one decoder layer: the layer prefix (for example `model.layers.3.`) is
discovered from the checkpoint, so wrappers such as `language_model.model.layers.3.` work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Scoring = Literal["softmax", "sigmoid"]
Renorm = Literal["always", "never", "config"]


@dataclass(frozen=True)
class ConfigKeys:
    """Config attribute names, all aliases in the order they are tried."""

    num_experts: tuple[str, ...]
    top_k: tuple[str, ...]
    expert_width: tuple[str, ...]
    num_shared: tuple[str, ...] = ()
    shared_width: tuple[str, ...] = ()
    renorm: tuple[str, ...] = ("norm_topk_prob",)
    scaling_factor: tuple[str, ...] = ("routed_scaling_factor",)
    n_group: tuple[str, ...] = ("n_group",)
    topk_group: tuple[str, ...] = ("topk_group",)


@dataclass(frozen=True)
class RouterSpec:
    """Where the router lives and how it turns logits into top-k weights.

    scoring: function applied to logits (`softmax` over all experts or `sigmoid` per expert).
    topk_first: True when top-k is taken on raw logits and the scoring applies to the k kept
        logits only (gpt-oss, granite, llama4); False when all experts are scored first.
    renorm: whether the k chosen weights are divided by their sum (`config` reads `renorm` keys).
    grouped: DeepSeek-style group-limited top-k (`n_group`, `topk_group`).
    logits_index: position of the raw router logits [T, E] in the router module's output.
    input_scaled: the router returns dense [T, E] scores that scale the experts' *input* and every
        expert runs on every token (Llama-4); top-k ids/weights are then read from the router
        output instead of the experts' arguments.
    """

    weight: str
    module: str
    experts_module: str
    scoring: Scoring = "softmax"
    topk_first: bool = False
    renorm: Renorm = "always"
    bias: str | None = None
    selection_bias: str | None = None
    grouped: bool = False
    scaled: bool = False
    note: str = ""
    logits_index: int = 0
    input_scaled: bool = False

    def describe(self) -> str:
        """A one-line human summary, e.g. `softmax -> top-k -> renorm`."""
        parts = ["top-k(logits)", self.scoring] if self.topk_first else [self.scoring]
        if self.selection_bias:
            parts.append("+bias select")
        if not self.topk_first:
            parts.append("grouped top-k" if self.grouped else "top-k")
        parts.append({"always": "renorm", "never": "no renorm", "config": "renorm if config"}[
            self.renorm])
        if self.scaled:
            parts.append("x scale")
        text = " -> ".join(parts)
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class ExpertLayout:
    """Routed-expert tensors on disk.

    Per-expert (`fused=False`): expert j's tensors are every key under `{prefix}.{j}.`, and
    `projections` maps roles (gate, up, down) to the file names (`w1`, `gate_proj`, ...).
    Fused (`fused=True`): every key under one of `prefixes` stacks experts on axis 0;
    `projections` maps roles (gate_up, down) to tensor names relative to the layer.
    `transposed`: fused weights are [E, in, out] instead of [E, out, in].
    `interleaved`: gate and up alternate on the last axis (gpt-oss) instead of being concatenated.
    """

    fused: bool
    prefixes: tuple[str, ...]
    projections: dict[str, str] = field(default_factory=dict)
    transposed: bool = False
    interleaved: bool = False

    def per_expert_key(self, expert: int, role: str) -> str:
        """Key (relative to the layer) of one projection weight of one expert."""
        return f"{self.prefixes[0]}.{expert}.{self.projections[role]}.weight"


Attention = Literal["gqa", "mla", "hybrid-linear"]


@dataclass(frozen=True)
class MoeFamily:
    """Everything moekit needs to know about one MoE family."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    keys: ConfigKeys
    router: RouterSpec
    experts: ExpertLayout
    shared_prefixes: tuple[str, ...] = ()
    attention: Attention = "gqa"
    dense_source: tuple[str, ...] = ()
    notes: str = ""

    @property
    def is_moe(self) -> bool:
        return True


@dataclass(frozen=True)
class DenseFamily:
    """A dense decoder family (an upcycling source)."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    mlp: dict[str, str]
    width_keys: tuple[str, ...] = ("intermediate_size",)
    attention: Attention = "gqa"
    notes: str = ""

    @property
    def is_moe(self) -> bool:
        return False


Family = MoeFamily | DenseFamily
