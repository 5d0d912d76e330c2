"""Run a checkpoint: in memory or streamed layer by layer (see `moekit.runtime.engine`)."""
