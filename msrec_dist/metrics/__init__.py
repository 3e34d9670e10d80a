"""Evaluation metrics: per scenario × task AUC, logloss and counts (see metrics/evaluator.py)."""
from msrec_dist.metrics.evaluator import ScenarioTaskMetrics

__all__ = ["ScenarioTaskMetrics"]
