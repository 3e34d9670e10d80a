"""A hand-made run directory in the contract training writes (msrec_dist/report/load.py), for
the report's tests: train_log.jsonl (loss + samples/s lines, val lines, an event), final_metrics.json,
config.json, eval_predictions.npz and model_weights.json, each optional."""
from __future__ import annotations

import json
import os

import numpy as np

SCENARIOS, TASKS = ["home", "search", "cart"], ["click", "convert"]


def metrics(rng: np.random.Generator, base: float) -> dict:
    """METRICS with AUCs near `base` (cart/convert undefined: null, as with one class)."""
    def cell(defined: bool = True) -> dict:
        return {"auc": float(base + rng.uniform(-0.05, 0.05)) if defined else None,
                "logloss": float(rng.uniform(0.2, 0.6)), "n": int(rng.integers(100, 1000))}
    return {"overall": {t: cell() for t in TASKS},
            "per_scenario": {s: {t: cell(not (s == "cart" and t == "convert")) for t in TASKS} for s in SCENARIOS}}


def gate_weights(rng: np.random.Generator, gates: int) -> list:
    """[S][G][E] rows summing to 1; task gate g sees expert g and the 2 shared ones (E = 4)."""
    out = []
    for _ in SCENARIOS:
        rows = []
        for g in range(gates):
            w = rng.uniform(0.1, 1.0, 4)
            if g < len(TASKS):
                w[[e for e in range(len(TASKS)) if e != g]] = 0.0
            rows.append((w / w.sum()).tolist())
        out.append(rows)
    return out


def write_run(path, *, model: str = "msrec", steps: int = 40, val: bool = True, samples_per_s: bool = True,
              predictions: bool = True, weights: str | None = "msrec", final: bool = True, seed: int = 0) -> str:
    """weights: "msrec" (2 CGC levels + mixing), "ple" (gates only), "none" (no gates: {}), None (no file)."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": {"name": model}, "train": {"log_every": 5}}, f)
    lines = []
    for step in range(5, steps + 1, 5):
        line = {"step": step, "loss": float(1.4 * np.exp(-step / 30) + 0.5)}
        if samples_per_s:
            line["samples_per_s"] = float(20000 + rng.normal(0, 800))
        lines.append(line)
        if val and step % 20 == 0:
            lines.append({"step": step, "epoch": step // 20 - 1, "val": metrics(rng, 0.7 + step / 400),
                          "metric": "mean_auc", "score": 0.7 + step / 400, "best": True})
    lines[2]["loss"] = None  # step 15: a non-finite loss (train.nan_policy=skip_batch) is logged as null
    lines.append({"event": "early_stop", "step": steps, "metric": "mean_auc"})
    with open(os.path.join(path, "train_log.jsonl"), "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    if final:
        selection = ({"metric": "mean_auc", "step": steps, "score": 0.8, "val": metrics(rng, 0.8)} if val else None)
        with open(os.path.join(path, "final_metrics.json"), "w") as f:
            json.dump({"model": model, "steps": steps, "train_samples": steps * 256, "wall_s": 1.5,
                       "train_samples_per_s": steps * 256 / 1.5, **metrics(rng, 0.72 + seed / 50),
                       "selection": selection}, f)
    if predictions:
        n = 600
        scenario = rng.integers(0, len(SCENARIOS), n)
        labels = (rng.uniform(size=(n, len(TASKS))) < [0.3, 0.1]).astype(np.float32)
        scores = np.clip(0.3 * labels + rng.uniform(0, 0.7, (n, len(TASKS))), 0, 1).astype(np.float32)
        np.savez(os.path.join(path, "eval_predictions.npz"), scores=scores, labels=labels, scenario=scenario,
                 task_names=np.array(TASKS), scenario_names=np.array(SCENARIOS))
    if weights is not None:
        summary: dict = {"scenario_names": SCENARIOS, "task_names": TASKS, "gates": {}}
        if weights in ("msrec", "ple"):
            names = ["click_0", "convert_0", "shared_0", "shared_1"]
            summary["gates"] = {
                "level_0": {"gate_names": TASKS + ["shared"], "expert_names": names, "rows": [300, 200, 100],
                            "weights": gate_weights(rng, 3)},
                "level_1": {"gate_names": TASKS, "expert_names": names, "rows": [300, 200, 0],
                            "weights": gate_weights(rng, 2)[:2] + [None]},
            }
        if weights == "msrec":
            summary["mixing"] = {"scenario_own_weight": [0.9, 0.85, 0.7], "task_own_weight": [0.92, 0.88],
                                 "scenario_scale": [0.4, 0.6], "task_scale": [0.55, 0.3]}
        with open(os.path.join(path, "model_weights.json"), "w") as f:
            json.dump(summary, f)
    return str(path)
