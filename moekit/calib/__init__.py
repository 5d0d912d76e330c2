"""Calibration data: files -> named domains -> token windows."""
