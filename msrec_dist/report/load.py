"""A run directory → `Run`: what training wrote there, each artifact optional.

    train_log.jsonl        {"step", "loss", "samples_per_s"} lines      → Run.train
                           {"step", "epoch", "val": METRICS, ...} lines  → Run.val
                           {"event": ...} lines                          → Run.events (not plotted)
    final_metrics.json     eval split METRICS, steps, throughput, selection → Run.final
    config.json            the experiment config (model name at ["model"]["name"]) → Run.config
    eval_predictions.npz   scores / labels [N, T], scenario [N], task_names, scenario_names → Run.predictions
    model_weights.json     GateRecorder.summary(): gate and mixing weights → Run.weights

METRICS = {"overall": {task: {"auc", "logloss", "n"}}, "per_scenario": {scenario: {task: {...}}}}.
A directory with none of train_log.jsonl, final_metrics.json, config.json is not a run directory
(NotARunDir, naming it). A missing or unreadable artifact is None, with the reason in Run.notes,
so the report can say "not available" instead of failing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

MARKERS = ("train_log.jsonl", "final_metrics.json", "config.json")


class NotARunDir(ValueError):
    """A path given as a run directory is none (it names the path)."""


@dataclass
class Predictions:
    scores: np.ndarray  # [N, T] float32 probabilities
    labels: np.ndarray  # [N, T] float32 0/1
    scenario: np.ndarray  # [N] int64 index into scenario_names
    task_names: list[str]
    scenario_names: list[str]


@dataclass
class Run:
    path: str
    label: str  # the name shown in the report (unique among the runs of one report)
    config: dict | None = None
    final: dict | None = None
    train: list[dict] = field(default_factory=list)  # step lines: step, loss, samples_per_s
    val: list[dict] = field(default_factory=list)  # val lines: step, epoch, val (METRICS), score, best
    events: list[dict] = field(default_factory=list)
    predictions: Predictions | None = None
    weights: dict | None = None
    notes: dict[str, str] = field(default_factory=dict)  # artifact → why it is not available

    @property
    def model(self) -> str | None:
        if self.final and self.final.get("model"):
            return str(self.final["model"])
        model = (self.config or {}).get("model")
        return str(model.get("name")) if isinstance(model, dict) and model.get("name") else None

    def scenario_names(self) -> list[str]:
        """Scenario names from whichever artifact has them (eval metrics first)."""
        for metrics in [self.final] + [v["val"] for v in self.val]:
            if metrics and isinstance(metrics.get("per_scenario"), dict):
                return list(metrics["per_scenario"])
        if self.predictions is not None:
            return list(self.predictions.scenario_names)
        return list((self.weights or {}).get("scenario_names", []))

    def task_names(self) -> list[str]:
        for metrics in [self.final] + [v["val"] for v in self.val]:
            if metrics and isinstance(metrics.get("overall"), dict):
                return list(metrics["overall"])
        if self.predictions is not None:
            return list(self.predictions.task_names)
        return list((self.weights or {}).get("task_names", []))


def _read_json(path: str, notes: dict[str, str]) -> dict | None:
    name = os.path.basename(path)
    if not os.path.exists(path):
        notes[name] = f"{name} not found"
        return None
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        notes[name] = f"{name} unreadable: {e}"
        return None
    if not isinstance(value, dict):
        notes[name] = f"{name} is not a JSON object"
        return None
    return value


def _read_log(path: str, run: Run) -> None:
    """Sorts train_log.jsonl's lines by kind; a line that is not JSON (a run killed mid-write)
    is skipped and counted in notes."""
    if not os.path.exists(path):
        run.notes["train_log.jsonl"] = "train_log.jsonl not found"
        return
    bad = 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(entry, dict):
                bad += 1
            elif "event" in entry:
                run.events.append(entry)
            elif isinstance(entry.get("val"), dict) and "step" in entry:
                run.val.append(entry)
            elif "step" in entry:
                run.train.append(entry)
    if bad:
        run.notes["train_log.jsonl"] = f"{bad} line(s) of train_log.jsonl are not JSON objects (skipped)"


def _read_predictions(path: str, notes: dict[str, str]) -> Predictions | None:
    name = os.path.basename(path)
    if not os.path.exists(path):
        notes[name] = f"{name} not found"
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            p = Predictions(scores=np.asarray(z["scores"], dtype=np.float64),
                            labels=np.asarray(z["labels"], dtype=np.float64),
                            scenario=np.asarray(z["scenario"], dtype=np.int64),
                            task_names=[str(t) for t in z["task_names"]],
                            scenario_names=[str(s) for s in z["scenario_names"]])
    except (OSError, ValueError, KeyError) as e:
        notes[name] = f"{name} unreadable: {e}"
        return None
    n, t = len(p.scenario), len(p.task_names)
    if p.scores.shape != (n, t) or p.labels.shape != (n, t):
        notes[name] = (f"{name}: scores {p.scores.shape} / labels {p.labels.shape} do not match "
                       f"{n} rows × {t} tasks")
        return None
    if n and (p.scenario.min() < 0 or p.scenario.max() >= len(p.scenario_names)):
        notes[name] = f"{name}: scenario ids outside 0..{len(p.scenario_names) - 1}"
        return None
    return p


def load_run(path: str, label: str | None = None) -> Run:
    """Reads one run directory; NotARunDir where `path` is none."""
    if not os.path.isdir(path):
        raise NotARunDir(f"{path}: no such directory")
    if not any(os.path.exists(os.path.join(path, m)) for m in MARKERS):
        raise NotARunDir(f"{path}: not a run directory (none of {', '.join(MARKERS)} in it)")
    run = Run(path=os.path.abspath(path), label=label or run_label(path))
    _read_log(os.path.join(path, "train_log.jsonl"), run)
    run.final = _read_json(os.path.join(path, "final_metrics.json"), run.notes)
    run.config = _read_json(os.path.join(path, "config.json"), run.notes)
    run.weights = _read_json(os.path.join(path, "model_weights.json"), run.notes)
    run.predictions = _read_predictions(os.path.join(path, "eval_predictions.npz"), run.notes)
    return run


def run_label(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def load_runs(paths: list[str]) -> list[Run]:
    """Every path read (the first NotARunDir raised); labels made unique: the directory's name,
    with its parent's where two share a name, then a number."""
    names = [run_label(p) for p in paths]
    labels = [f"{os.path.basename(os.path.dirname(os.path.normpath(os.path.abspath(p))))}/{name}"
              if names.count(name) > 1 else name for p, name in zip(paths, names)]
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} ({seen[label]})"
    return [load_run(p, label) for p, label in zip(paths, labels)]
