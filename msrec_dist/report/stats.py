"""ROC curves and the F1-maximising threshold of one scenario × task cell, from scores and labels.

    roc_curve(scores [N], labels [N])  → fpr, tpr [K+1] (from (0, 0)), thresholds [K], auc
    best_f1(scores [N], labels [N])    → threshold, f1, precision, recall (predict 1 where score ≥ threshold)

Both walk the distinct scores from the highest down (ties move together, as torchmetrics'
exact BinaryAUROC does), so the AUC equals final_metrics.json's for the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Roc:
    fpr: np.ndarray  # [K+1]
    tpr: np.ndarray  # [K+1]
    thresholds: np.ndarray  # [K] distinct scores, descending
    auc: float


@dataclass
class BestF1:
    threshold: float
    f1: float
    precision: float
    recall: float


def _cumulative(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds [K] (descending) and the true / false positives [K] at each."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order] > 0.5
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last row of each distinct score
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return s[last_of_tie], tp.astype(np.float64), fp.astype(np.float64)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> Roc | None:
    """None where the AUC is not defined (no rows, or one class only)."""
    positives = float((labels > 0.5).sum())
    negatives = float(labels.size - positives)
    if positives == 0 or negatives == 0:
        return None
    thresholds, tp, fp = _cumulative(scores, labels)
    tpr, fpr = np.r_[0.0, tp / positives], np.r_[0.0, fp / negatives]
    return Roc(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=float(np.trapezoid(tpr, fpr)))


def best_f1(scores: np.ndarray, labels: np.ndarray) -> BestF1 | None:
    """The threshold of highest F1 (the highest threshold among ties); None without positives."""
    positives = float((labels > 0.5).sum())
    if positives == 0:
        return None
    thresholds, tp, fp = _cumulative(scores, labels)
    f1 = 2 * tp / (tp + fp + positives)  # 2TP / (2TP + FP + FN), FN = P − TP
    i = int(np.argmax(f1))
    return BestF1(threshold=float(thresholds[i]), f1=float(f1[i]), precision=float(tp[i] / (tp[i] + fp[i])),
                  recall=float(tp[i] / positives))


def thin_curve(x: np.ndarray, y: np.ndarray, points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` points of a curve (evenly by index, both ends kept), for a light PNG."""
    if x.size <= points:
        return x, y
    idx = np.unique(np.r_[np.linspace(0, x.size - 1, points).astype(np.int64), x.size - 1])
    return x[idx], y[idx]
