"""Evaluation: units (model, task, seed) x methods, resumable result files, reports."""
from .config import ORACLE, EvalConfig, legacy_methods
from .runner import run, run_unit, run_units

__all__ = ["EvalConfig", "ORACLE", "legacy_methods", "run", "run_unit", "run_units"]
