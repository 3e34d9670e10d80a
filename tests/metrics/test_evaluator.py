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
