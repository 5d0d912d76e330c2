"""`moekit prune`: pick experts to drop from profile statistics, write the smaller checkpoint."""

from moekit.ops.prune.surgery import PruneResult, prune_checkpoint

__all__ = ["PruneResult", "prune_checkpoint"]
