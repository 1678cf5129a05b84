"""Experiment orchestration: parallel-safe grids (claims, progress) and Optuna tuning."""
