"""Find the family record for a checkpoint from its `config.json`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.errors import UnsupportedModelError
from moekit.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE
from moekit.families.dense import DENSE_FAMILIES
from moekit.families.ernie import ERNIE4_5_MOE
from moekit.families.gpt_oss import GPT_OSS
from moekit.families.granite import GRANITEMOE
from moekit.families.hunyuan import HUNYUAN_V1_MOE
from moekit.families.llama4 import LLAMA4
from moekit.families.minimax import MINIMAX_M2
from moekit.families.mixtral import MIXTRAL
from moekit.families.olmoe import OLMOE
from moekit.families.phimoe import PHIMOE
from moekit.families.qwen import QWEN2_MOE, QWEN3_5_MOE, QWEN3_MOE, QWEN3_NEXT
from moekit.families.spec import Family, MoeFamily

MOE_FAMILIES: tuple[MoeFamily, ...] = (
    MIXTRAL, QWEN2_MOE, QWEN3_MOE, QWEN3_NEXT, QWEN3_5_MOE, DEEPSEEK_V2, DEEPSEEK_V3, GLM4_MOE,
    OLMOE, GPT_OSS, LLAMA4, GRANITEMOE, PHIMOE, ERNIE4_5_MOE, MINIMAX_M2, HUNYUAN_V1_MOE,
)
ALL_FAMILIES: tuple[Family, ...] = (*MOE_FAMILIES, *DENSE_FAMILIES)
TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config")


@dataclass(frozen=True)
class Resolved:
    """A family matched to a config. `config` is the (text) sub-config the family reads,
    `config_path` the keys leading to it from the top of config.json (empty at top level)."""

    family: Family
    config: dict[str, Any]
    config_path: tuple[str, ...]

    @property
    def is_moe(self) -> bool:
        return isinstance(self.family, MoeFamily)


def by_name(name: str) -> Family:
    """The family record called `name` (e.g. `mixtral`)."""
    for family in ALL_FAMILIES:
        if family.name == name or name in family.model_types:
            return family
    known = ", ".join(f.name for f in ALL_FAMILIES)
    raise UnsupportedModelError(f"unknown family '{name}'", f"known families: {known}")


def resolve(config: dict[str, Any]) -> Resolved:
    """Match a config.json dict (or its text sub-config) to a family record.

    Matching uses `model_type` first, then `architectures`. When config.json nests a text
    sub-config (`text_config`, as Llama-4, Qwen3.5-MoE and Gemma-3 do), the family reads that
    sub-config even if it was recognised by the top-level model_type. Raises
    UnsupportedModelError naming every family tried and why it was rejected.
    """
    candidates: list[tuple[dict[str, Any], tuple[str, ...]]] = [(config, ())]
    for key in TEXT_CONFIG_KEYS:
        if isinstance(config.get(key), dict):
            candidates.append((config[key], (key,)))
    for sub, path in reversed(candidates):
        model_type = sub.get("model_type")
        for family in ALL_FAMILIES:
            if model_type in family.model_types:
                return Resolved(family, *(candidates[-1] if not path else (sub, path)))
    architectures = list(config.get("architectures") or [])
    for family in ALL_FAMILIES:
        if any(a in family.architectures for a in architectures):
            sub, path = candidates[-1]
            return Resolved(family, sub, path)
    seen = [c.get("model_type") for c, _ in candidates]
    tried = "; ".join(
        f"{f.name} (model_type {'/'.join(f.model_types)}, architectures "
        f"{'/'.join(f.architectures)})" for f in ALL_FAMILIES)
    raise UnsupportedModelError(
        f"unsupported architecture: model_type {seen} and architectures {architectures} match "
        f"no family record; tried {tried}",
        "see docs/adding-a-family.md to add one")


def first_value(config: dict[str, Any], keys: tuple[str, ...], default: Any = None) -> Any:
    """The value of the first key in `keys` present in `config` (aliases in order)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def first_key(config: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """The first alias in `keys` that `config` actually uses."""
    return next((k for k in keys if k in config), None)
