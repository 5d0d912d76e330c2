"""`moekit merge`: fold routed experts into clusters, write the smaller checkpoint."""

from moekit.ops.merge.plan import MergePlan
from moekit.ops.merge.surgery import MergeResult, merge_checkpoint

__all__ = ["MergePlan", "MergeResult", "merge_checkpoint"]
