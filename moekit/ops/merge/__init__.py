"""`moekit merge`: fold routed experts into clusters (`grouping`, `combine`, `fit`; `refit` over
`layerfit/`), write the smaller checkpoint (`surgery`, over `surgery/`)."""

from moekit.ops.merge.plan import MergePlan
from moekit.ops.merge.surgery import MergeResult, merge_checkpoint

__all__ = ["MergePlan", "MergeResult", "merge_checkpoint"]
