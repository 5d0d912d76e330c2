"""Calibration data: files -> named domains -> token windows; router hooks, routing maths,
statistics accumulators and MoE-block captures. Imports `io/` and `families/`, never `runtime/`."""
