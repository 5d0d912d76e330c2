"""Calibration data: files -> named domains -> token windows (`DataSpec` in spec.py: the data
options of every command as one frozen record); router hooks, routing maths, statistics
accumulators and MoE-block captures. Imports `io/` and `families/`, never `runtime/`."""
