"""Per scenario × task AUC, logloss and counts, synced across ranks by torchmetrics.

    update(logits [B, T], labels [B, T], scenario [B])   (any number of batches, any rank)
    compute() → {"overall": {task: {auc, logloss, n}}, "per_scenario": {name: {task: {...}}}}

AUC is torchmetrics' exact `BinaryAUROC` (thresholds=None keeps every prediction); logloss is
a `SumMetric` of per-sample binary cross-entropy divided by a `SumMetric` count. `compute()`
gathers the states of every rank (torch.distributed, gloo or nccl), so every rank gets the
global numbers — the same as one process over all ranks' predictions.

A value that is not defined is None (null in JSON, "n/a" in the table), never a number:
    n == 0                          auc None, logloss None
    labels all 0 or all 1           auc None (BinaryAUROC would say 0.0)
    a NaN/inf prediction (the loss  auc None, logloss None (the sum keeps NaN: nan_strategy
    sum is not finite)              NaN; SumMetric's default drops it and reports 0.0)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric
from torchmetrics.classification import BinaryAUROC


class _Cell(nn.Module):
    """AUC + logloss + count of one (scenario or overall) × task cell."""

    def __init__(self) -> None:
        super().__init__()
        self.auc = BinaryAUROC(thresholds=None)
        self.loss_sum = SumMetric(nan_strategy=float("nan"))  # a NaN stays NaN (default: dropped)
        self.count = SumMetric()
        self.positives = SumMetric()  # AUC needs both classes

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        # AUROC states are concatenated even when empty, so every rank contributes a tensor
        self.auc.update(torch.sigmoid(logits.float()), labels.long())
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum")
        self.loss_sum.update(bce)
        self.count.update(torch.tensor(float(labels.numel())))
        self.positives.update(labels.float().sum())

    def compute(self) -> dict:
        n = int(self.count.compute().item())
        if n == 0:
            return {"auc": None, "logloss": None, "n": 0}
        loss_sum = float(self.loss_sum.compute().item())
        if not math.isfinite(loss_sum):  # a prediction was NaN or inf: neither number means anything
            return {"auc": None, "logloss": None, "n": n}
        positives = int(self.positives.compute().item())
        auc = float(self.auc.compute().item()) if 0 < positives < n else None
        return {"auc": auc, "logloss": loss_sum / n, "n": n}


class ScenarioTaskMetrics(nn.Module):
    def __init__(self, scenario_names: list[str], task_names: list[str]) -> None:
        super().__init__()
        self.scenario_names, self.task_names = list(scenario_names), list(task_names)
        self.overall = nn.ModuleList(_Cell() for _ in task_names)
        self.cells = nn.ModuleList(nn.ModuleList(_Cell() for _ in task_names) for _ in scenario_names)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, scenario: torch.Tensor) -> None:
        for t, cell in enumerate(self.overall):
            cell.update(logits[:, t], labels[:, t])
        for s, row in enumerate(self.cells):
            rows = scenario == s  # boolean mask: a host sync, eval only
            for t, cell in enumerate(row):
                cell.update(logits[rows, t], labels[rows, t])

    def compute(self) -> dict:
        return {
            "overall": {t: cell.compute() for t, cell in zip(self.task_names, self.overall)},
            "per_scenario": {
                s: {t: cell.compute() for t, cell in zip(self.task_names, row)}
                for s, row in zip(self.scenario_names, self.cells)
            },
        }


def format_table(metrics: dict, oracle: dict | None = None) -> str:
    """Markdown table: one row per scenario (and overall), AUC / logloss / n per task; an undefined
    value (None) shows as n/a."""
    tasks = list(metrics["overall"])
    header = "| scenario | " + " | ".join(f"{t} AUC | {t} logloss | {t} n" for t in tasks) + " |"
    lines = [header, "|" + "---|" * (1 + 3 * len(tasks))]
    rows = list(metrics["per_scenario"].items()) + [("overall", metrics["overall"])]
    for name, cells in rows:
        parts = []
        for t in tasks:
            c = cells[t]
            auc, logloss = ("n/a" if v is None or not math.isfinite(v) else f"{v:.4f}" for v in (c["auc"], c["logloss"]))
            parts.append(f"{auc} | {logloss} | {c['n']}")
        lines.append(f"| {name} | " + " | ".join(parts) + " |")
    return "\n".join(lines)
