"""Family records: one per MoE (and dense) architecture, and the registry that matches configs;
`layout` maps a record onto a checkpoint's tensor names (and checks config against tensors),
`fingerprint` identifies a checkpoint (names, dtypes, shapes, router weights).
Imports only `io/` (and `errors`)."""

from moekit.families.registry import ALL_FAMILIES, MOE_FAMILIES, Resolved, by_name, resolve
from moekit.families.spec import DenseFamily, ExpertLayout, Family, MoeFamily, RouterSpec

__all__ = ["ALL_FAMILIES", "MOE_FAMILIES", "DenseFamily", "ExpertLayout", "Family", "MoeFamily",
           "Resolved", "RouterSpec", "by_name", "resolve"]
