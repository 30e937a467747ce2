"""Calibration data and activation capture for Hessian-aware rounding."""
