"""Per scenario × task metrics: values against sklearn-free hand checks, and global across
ranks — 2 gloo ranks with uneven shares equal one process over all predictions (1e-6)."""
import json
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from msrec_dist.metrics.evaluator import ScenarioTaskMetrics, format_table

SCENARIOS, TASKS = ["home", "search", "cart"], ["click", "convert"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fake_predictions(n: int = 3000):
    g = torch.Generator().manual_seed(0)
    scenario = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), n, replacement=True, generator=g)
    labels = (torch.rand(n, 2, generator=g) < 0.3).float()
    logits = labels * 1.2 + torch.randn(n, 2, generator=g)
    return logits, labels, scenario


def rank_slices(n: int, world: int) -> list[list[tuple[int, int]]]:
    """Uneven batches per rank: rank 0 gets batches of 400, rank 1 of 150, interleaved."""
    out, start, r = [[] for _ in range(world)], 0, 0
    while start < n:
        size = 400 if r == 0 else 150
        out[r].append((start, min(n, start + size)))
        start, r = start + size, (r + 1) % world
    return out


def test_values_match_direct_computation():
    logits, labels, scenario = fake_predictions()
    m = ScenarioTaskMetrics(SCENARIOS, TASKS)
    m.update(logits[:1000], labels[:1000], scenario[:1000])
    m.update(logits[1000:], labels[1000:], scenario[1000:])
    out = m.compute()
    for s, name in enumerate(SCENARIOS):
        rows = scenario == s
        for t, task in enumerate(TASKS):
            cell = out["per_scenario"][name][task]
            assert cell["n"] == int(rows.sum())
            assert math.isclose(cell["auc"], float(binary_auroc(torch.sigmoid(logits[rows, t]), labels[rows, t].long())),
                                abs_tol=1e-6)
            bce = F.binary_cross_entropy_with_logits(logits[rows, t], labels[rows, t]).item()
            assert math.isclose(cell["logloss"], bce, rel_tol=1e-5)
    assert out["overall"]["click"]["n"] == len(labels)
    assert "| cart |" in format_table(out)


def test_two_ranks_equal_one_process(tmp_path):
    path = tmp_path / "two.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "tests/metrics/metrics_worker.py", str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(path.read_text())
    logits, labels, scenario = fake_predictions()
    one = ScenarioTaskMetrics(SCENARIOS, TASKS)
    one.update(logits, labels, scenario)
    one = one.compute()
    for name in SCENARIOS:
        for task in TASKS:
            a, b = two["per_scenario"][name][task], one["per_scenario"][name][task]
            assert a["n"] == b["n"]
            assert abs(a["auc"] - b["auc"]) <= 1e-6 and abs(a["logloss"] - b["logloss"]) <= 1e-6, (name, task, a, b)
    for task in TASKS:
        assert abs(two["overall"][task]["auc"] - one["overall"][task]["auc"]) <= 1e-6


def test_undefined_values_are_none_and_strict_json(tmp_path):
    """A scenario whose click labels are all 0 has no AUC (None, not 0.0); a scenario with no rows
    has neither AUC nor logloss; the table says n/a and the written JSON has no bare NaN."""
    from msrec_dist.training.runner import write_json_atomic

    logits, labels, scenario = fake_predictions()
    scenario[scenario == 2] = 1  # no cart rows at all
    labels[scenario == 1, 0] = 0.0  # search: every click label 0
    m = ScenarioTaskMetrics(SCENARIOS, TASKS)
    m.update(logits, labels, scenario)
    out = m.compute()
    search, cart = out["per_scenario"]["search"], out["per_scenario"]["cart"]
    assert search["click"]["auc"] is None and search["click"]["n"] > 0
    assert math.isfinite(search["click"]["logloss"]) and search["convert"]["auc"] is not None
    assert cart["click"] == {"auc": None, "logloss": None, "n": 0}
    assert "| search | n/a |" in format_table(out)

    def no_constants(token):
        raise ValueError(f"bare {token} in the written metrics")

    write_json_atomic(str(tmp_path / "m.json"), out)
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=no_constants) == out


def test_nan_prediction_is_not_logloss_zero():
    """SumMetric drops NaN by default: a cell whose every prediction is NaN reported logloss 0.0.
    Now a non-finite loss sum makes the cell's logloss and AUC None; other cells keep their numbers."""
    logits, labels, scenario = fake_predictions()
    logits[scenario == 0] = float("nan")
    m = ScenarioTaskMetrics(SCENARIOS, TASKS)
    m.update(logits, labels, scenario)
    out = m.compute()
    for cell in (out["per_scenario"]["home"]["click"], out["overall"]["click"]):
        assert cell["logloss"] is None and cell["auc"] is None and cell["n"] > 0
    assert math.isfinite(out["per_scenario"]["search"]["click"]["logloss"])
