"""Family records: one per MoE (and dense) architecture, and the registry that matches configs."""

from moekit.families.registry import ALL_FAMILIES, MOE_FAMILIES, Resolved, by_name, resolve
from moekit.families.spec import DenseFamily, ExpertLayout, Family, MoeFamily, RouterSpec

__all__ = ["ALL_FAMILIES", "MOE_FAMILIES", "DenseFamily", "ExpertLayout", "Family", "MoeFamily",
           "Resolved", "RouterSpec", "by_name", "resolve"]
