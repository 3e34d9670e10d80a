"""msrec_dist/report/stats.py against brute force: the AUC of the ROC curve is the pairwise
probability (ties count one half), the best-F1 threshold is the best over every threshold."""
from __future__ import annotations

import numpy as np
import pytest

from msrec_dist.report.stats import best_f1, roc_curve, thin_curve


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_and_best_f1_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=300) < 0.3).astype(np.float32)
    scores = np.round(0.3 * labels + rng.uniform(size=300), 2)  # rounded: many ties
    roc = roc_curve(scores, labels)
    assert roc.auc == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)
    assert roc.fpr[0] == roc.tpr[0] == 0 and roc.fpr[-1] == roc.tpr[-1] == 1
    assert np.all(np.diff(roc.fpr) >= 0) and np.all(np.diff(roc.tpr) >= 0)
    best = best_f1(scores, labels)
    f1s = {}
    for t in np.unique(scores):
        pred = scores >= t
        tp = float((pred & (labels > 0.5)).sum())
        f1s[float(t)] = 2 * tp / (pred.sum() + labels.sum())
    top = max(f1s.values())
    assert best.f1 == pytest.approx(top)
    assert best.threshold == max(t for t, f in f1s.items() if f == pytest.approx(top))
    pred = scores >= best.threshold
    assert best.precision == pytest.approx((pred & (labels > 0.5)).sum() / pred.sum())
    assert best.recall == pytest.approx((pred & (labels > 0.5)).sum() / labels.sum())


def test_undefined_cells():
    assert roc_curve(np.array([0.2, 0.4]), np.array([1.0, 1.0])) is None  # one class
    assert roc_curve(np.array([]), np.array([])) is None
    assert best_f1(np.array([0.2, 0.4]), np.array([0.0, 0.0])) is None  # no positives


def test_thin_curve_keeps_both_ends():
    x = np.linspace(0, 1, 10_001)
    tx, ty = thin_curve(x, x ** 2, points=100)
    assert tx.size <= 101 and tx[0] == 0 and tx[-1] == 1 and np.all(np.diff(tx) > 0)
