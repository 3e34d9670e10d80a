"""Model selection on the val split: the score of an evaluation, the best so far, early stopping.

    val metrics (evaluate.py) ──score(metrics, metric)──► float (None: undefined)
    BestTracker.update(step, score) ──► is this the best evaluation? stop now (patience spent)?

Metrics: mean_auc = the mean AUC over the scenario × task cells (cells whose AUC is undefined, one
class only, are left out); logloss = their mean logloss (lower is better); <scenario>/<task> = one
cell's AUC, <scenario>/<task>/logloss its logloss (<scenario> may be `overall`).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass


def higher_is_better(metric: str) -> bool:
    return not metric.endswith("logloss")


def check_metric(metric: str, scenario_names: list[str], task_names: list[str]) -> None:
    """Raise ValueError if `metric` names a cell the data does not have (before any step)."""
    if metric in ("mean_auc", "logloss"):
        return
    scenario, task = metric.split("/")[:2]
    if scenario not in [*scenario_names, "overall"] or task not in task_names:
        raise ValueError(f"train.early_stop.metric {metric!r}: no such cell; scenarios {scenario_names} "
                         f"(or overall), tasks {task_names}")


def score(metrics: dict, metric: str) -> float | None:
    """The value of `metric` in evaluate()'s metrics dict; None where it is undefined."""
    if metric in ("mean_auc", "logloss"):
        key = "auc" if metric == "mean_auc" else "logloss"
        values = [cell[key] for tasks in metrics["per_scenario"].values() for cell in tasks.values()
                  if cell[key] is not None]
        return statistics.fmean(values) if values else None
    parts = metric.split("/")
    cells = metrics["overall"] if parts[0] == "overall" else metrics["per_scenario"][parts[0]]
    value = cells[parts[1]]["logloss" if len(parts) == 3 else "auc"]
    return None if value is None or not math.isfinite(value) else value


@dataclass
class BestTracker:
    """The best evaluation so far and the evaluations since; saved with each checkpoint's progress
    so a resumed run goes on counting. An undefined score never counts as an improvement."""
    metric: str = "mean_auc"
    patience: int = 0  # 0: never stop
    min_delta: float = 0.0
    best_step: int = -1
    best_score: float | None = None
    since_best: int = 0  # evaluations since the best one
    stopped: bool = False  # patience ran out

    def better(self, value: float | None) -> bool:
        if value is None:
            return False
        if self.best_score is None:
            return True
        sign = 1.0 if higher_is_better(self.metric) else -1.0
        return sign * (value - self.best_score) > self.min_delta

    def update(self, step: int, value: float | None) -> tuple[bool, bool]:
        """Record an evaluation at `step`: (it is the new best, training should stop)."""
        is_best = self.better(value)
        if is_best:
            self.best_step, self.best_score, self.since_best = step, value, 0
        else:
            self.since_best += 1
        self.stopped = self.patience > 0 and self.since_best >= self.patience
        return is_best, self.stopped

    def adopt(self, step: int, value: float | None) -> None:
        """A best found on disk (checkpoints/best, saved after the checkpoint a run resumed from):
        it stays the best unless beaten."""
        if self.better(value):
            self.best_step, self.best_score = step, value

    def state(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ("best_step", "best_score", "since_best", "stopped")}
