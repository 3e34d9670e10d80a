"""benchmarks/scale.py end to end at tiny sizes: every point runs in its own process and the
results files are well formed. No timing is checked (the figures are the script's to report)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from benchmarks import perf_common as P
from benchmarks import scale as S


def test_zipf_ids_span_the_table_and_stay_in_range():
    rng = np.random.default_rng(0)
    ids = S.zipf_ids(rng, 50_000, 1_000_000)
    assert ids.min() >= 0 and ids.max() < 1_000_000
    assert len(np.unique(ids)) > 1_000  # a spread, not a handful of rows
    assert ids.max() > 500_000  # the popular ranks are hashed over the whole table


def test_write_data_has_the_tasks_and_scenarios(tmp_path):
    from msrec_dist.data.schema import load_data_config

    data = load_data_config(S.write_data(str(tmp_path), rows=500, scenarios=5, tasks=4, n=300))
    assert [t.name for t in data.tasks] == ["click", "task1", "task2", "task3"]
    assert len(data.scenario.names) == 5
    assert {t.name: t.num_embeddings for t in data.tables()}["big"] == 500


def test_scale_runs_end_to_end_and_writes_results(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.scale", "--rows", "1000", "3000", "--scenarios", "3",
           "--tasks", "2", "--batch", "128", "--warmup", "1", "--steps", "2", "--chunks", "2",
           "--out-dir", str(tmp_path), "--name", "smoke"]
    proc = subprocess.run(cmd, cwd=P.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "smoke.json").read_text())
    md = (tmp_path / "smoke.md").read_text()
    # three points (each a process: ~7 s) keep the test short; write_data's test covers scenarios and tasks
    assert [p["sweep"] for p in res["points"]] == ["base", "rows", "base_again"]
    assert [(p["rows"], p["scenarios"], p["tasks"]) for p in res["points"]] == [(1000, 3, 2), (3000, 3, 2), (1000, 3, 2)]
    for p in res["points"]:
        assert p["samples_per_s"] > 0 and len(p["chunk_samples_per_s"]) == 2
        assert p["peak_rss"] >= p["rss_end"] > 0
        # the bytes the script computes are the bytes the train state holds
        assert p["computed"]["weight_bytes"] == p["held"]["weight_bytes"]
        assert p["computed"]["optimizer_bytes"] == p["held"]["optimizer_bytes"]
        assert p["computed"]["weight_bytes"] == (p["rows"] + S.ITEMS + S.CATEGORIES) * S.DIM * 4
        assert isinstance(p["rss_holds"], bool) and "big" in p["plan"]  # the table's bound: checked here
        assert p["dense_param_bytes"] > 0 and p["flops_per_sample"] > 0
    t = res["targets"]
    assert t["sps"]["rows"] == 3000 and isinstance(t["sps"]["holds"], bool)
    assert isinstance(t["rss"]["holds"], bool) and res["overhead_bytes"] > 0
    assert res["machine"]["label"] == S.MACHINE and res["commit"] and res["date"]
    assert md.startswith("# Scale") and "| sweep |" in md and "target ≥ 0.7" in md
