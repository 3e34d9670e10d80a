"""Model selection on val (msrec_dist/training/selection.py and the runner): the score of an
evaluation, the best-so-far tracker and its patience, and in-process runs on a world of one: val
lines in train_log.jsonl, checkpoints/best, the eval split scored with the best weights, early
stopping, and a resumed run that goes on counting."""
import itertools
import json
import math
import os

import pytest

from msrec_dist.config import load_experiment
from msrec_dist.data.synth import generate
from msrec_dist.distributed.checkpoint import best_checkpoint
from msrec_dist.distributed.context import init_distributed
from msrec_dist.training import runner
from msrec_dist.training.selection import BestTracker, check_metric, score
from msrec_dist.typed_yaml import ConfigError
from tests.distributed.launch import REPO, TINY_MODEL


def _metrics(aucs: dict, loglosses: dict | None = None) -> dict:
    loglosses = loglosses or {k: 0.5 for k in aucs}
    per = {}
    for (s, t), auc in aucs.items():
        per.setdefault(s, {})[t] = {"auc": auc, "logloss": loglosses[(s, t)], "n": 10}
    return {"overall": {"click": {"auc": 0.6, "logloss": 0.4, "n": 20}}, "per_scenario": per}


def test_score_of_each_metric():
    m = _metrics({("a", "click"): 0.7, ("a", "buy"): None, ("b", "click"): 0.8, ("b", "buy"): 0.6},
                 {("a", "click"): 0.3, ("a", "buy"): 0.1, ("b", "click"): 0.5, ("b", "buy"): 0.2})
    assert math.isclose(score(m, "mean_auc"), (0.7 + 0.8 + 0.6) / 3)  # the undefined cell left out
    assert math.isclose(score(m, "logloss"), (0.3 + 0.1 + 0.5 + 0.2) / 4)
    assert score(m, "b/click") == 0.8 and score(m, "a/buy") is None
    assert score(m, "a/click/logloss") == 0.3 and score(m, "overall/click") == 0.6
    check_metric("b/click", ["a", "b"], ["click", "buy"])
    with pytest.raises(ValueError, match="no such cell"):
        check_metric("c/click", ["a", "b"], ["click", "buy"])


def test_tracker_patience_direction_and_min_delta():
    t = BestTracker("mean_auc", patience=2, min_delta=0.01)
    assert t.update(1, 0.60) == (True, False)
    assert t.update(2, 0.605) == (False, False)  # within min_delta: not an improvement
    assert t.update(3, 0.62) == (True, False)
    assert t.update(4, None) == (False, False)  # undefined never improves
    assert t.update(5, 0.5) == (False, True) and t.stopped and t.best_step == 3
    low = BestTracker("logloss")
    assert low.update(1, 0.5)[0] and low.update(2, 0.4)[0] and not low.update(3, 0.45)[0]
    assert low.best_step == 2 and not low.stopped  # patience 0: never stops


def test_early_stop_config_is_checked():
    with pytest.raises(ConfigError, match="metric"):
        load_experiment(os.path.join(REPO, "configs/msrec_full.yaml"), "d.yaml", ("train.early_stop.metric=a/b/c",))
    with pytest.raises(ConfigError, match="patience"):
        load_experiment(os.path.join(REPO, "configs/msrec_full.yaml"), "d.yaml", ("train.early_stop.patience=-1",))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return generate(str(tmp_path_factory.mktemp("sel_data")), rows=3_000, shards=2, seed=5, eval_rows=500,
                    users=300, items=200)


def run(data, run_dir, *sets, **kw):
    cfg = load_experiment(os.path.join(REPO, "configs/msrec_full.yaml"), data,
                          tuple(TINY_MODEL) + ("reader.batch_size=128", f"run.dir={run_dir}", "run.progress=false")
                          + sets)
    return runner.run(cfg, init_distributed(), **kw)


def worsening_scores(monkeypatch) -> None:
    """Each val evaluation scores lower than the one before: the first stays the best."""
    calls = itertools.count()
    monkeypatch.setattr(runner, "score", lambda metrics, metric: -float(next(calls)))


def val_lines(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [e for e in map(json.loads, f) if "val" in e]


def test_val_evaluations_pick_the_best_checkpoint(data, tmp_path):
    out = run(data, tmp_path / "r", "train.eval_every=4", "train.max_steps=14")
    lines = val_lines(tmp_path / "r")
    assert [e["step"] for e in lines] == [4, 8, 12, 14]  # and the last weights
    scores = [e["score"] for e in lines]
    best = lines[max(range(len(scores)), key=scores.__getitem__)]
    assert [e["best"] for e in lines] == [e["score"] > max(scores[:i], default=-1) for i, e in enumerate(lines)]
    path, info = best_checkpoint(str(tmp_path / "r" / "checkpoints"))
    assert info["step"] == best["step"] and info["score"] == best["score"]
    assert out["selection"]["step"] == best["step"] and out["evaluated_step"] == best["step"]
    assert out["selection"]["val"] == best["val"]
    with open(tmp_path / "r" / "final_metrics.json") as f:
        assert json.load(f)["selection"]["step"] == best["step"]
    # every loss line says the training samples/s
    with open(tmp_path / "r" / "train_log.jsonl") as f:
        assert all(e["samples_per_s"] > 0 for e in map(json.loads, f) if "loss" in e)


def test_eval_uses_the_best_weights_and_patience_stops(data, tmp_path, monkeypatch):
    """A score that only gets worse: the first evaluation stays best, patience 2 stops two
    evaluations later, and the eval split is scored with step 3's weights: the same metrics as a
    run trained for 3 steps alone."""
    worsening_scores(monkeypatch)
    out = run(data, tmp_path / "r", "train.eval_every=3", "train.max_steps=30", "train.early_stop.patience=2")
    assert out["early_stopped"] and out["steps"] == 9 and out["selection"]["step"] == 3
    assert out["evaluated_step"] == 3
    with open(tmp_path / "r" / "train_log.jsonl") as f:
        events = [e for e in map(json.loads, f) if e.get("event") == "early_stop"]
    assert events and events[0]["step"] == 9 and events[0]["best_step"] == 3
    monkeypatch.undo()
    alone = run(data, tmp_path / "alone", "train.eval_every=0", "train.max_steps=3")
    assert alone["selection"] is None and alone["evaluated_step"] == 3
    assert out["per_scenario"] == alone["per_scenario"] and out["overall"] == alone["overall"]
    # resumed, an early-stopped run trains no further
    again = run(data, tmp_path / "r", "train.eval_every=3", "train.max_steps=30", "train.early_stop.patience=2",
                resume=True)
    assert again["steps"] == 9 and again["per_scenario"] == out["per_scenario"]


def test_resumed_run_goes_on_counting_patience(data, tmp_path, monkeypatch):
    worsening_scores(monkeypatch)
    run(data, tmp_path / "r", "train.eval_every=5", "train.max_steps=20", "train.early_stop.patience=5")
    # evaluations at 5 (best), 10, 15, 20: 3 since the best; two more reach the patience of 5
    out = run(data, tmp_path / "r", "train.eval_every=5", "train.max_steps=40", "train.early_stop.patience=5",
              resume=True)
    assert out["early_stopped"] and out["steps"] == 30 and out["selection"]["step"] == 5


def test_no_val_split_no_selection(tmp_path):
    no_val = generate(str(tmp_path / "d"), rows=1_000, shards=1, seed=1, eval_rows=200, users=100, items=50,
                      val_rows=0)
    out = run(no_val, tmp_path / "r", "train.max_steps=3")
    assert out["selection"] is None and not val_lines(tmp_path / "r")
    assert not os.path.exists(tmp_path / "r" / "checkpoints" / "best")


def test_eval_predictions_file(data, tmp_path):
    import numpy as np

    out = run(data, tmp_path / "r", "train.max_steps=3")
    p = np.load(tmp_path / "r" / "eval_predictions.npz")
    assert p["scores"].shape == p["labels"].shape == (500, 2) and p["scenario"].shape == (500,)
    assert sorted(p["rows"].tolist()) == list(range(500))  # every eval row once, by its position
    assert ((p["scores"] > 0) & (p["scores"] < 1)).all()
    assert list(p["task_names"]) == ["click", "convert"] and len(p["scenario_names"]) == 3
    assert sum(c["click"]["n"] for c in out["per_scenario"].values()) == 500
