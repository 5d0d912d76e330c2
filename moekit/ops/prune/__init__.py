"""`moekit prune`: pick experts to drop from profile statistics (`select`) or calibration data
(`calibrated`, over `layerfit/`), write the smaller checkpoint (`surgery`, over `surgery/`)."""

from moekit.ops.prune.surgery import PruneResult, prune_checkpoint

__all__ = ["PruneResult", "prune_checkpoint"]
