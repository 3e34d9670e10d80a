"""Runs → the report's sections: plots written to <out>/report/, tables, and "not available"
where an artifact is missing.

    build_report(run_dirs, out=None) → <out>/report.html   (out: the first run directory)

    across runs   a summary table (model, steps, samples/s, selection, mean eval AUC) and the eval
                  AUC bar chart per scenario × task (one bar per run) with its table
    per run       loss curves · val AUC per scenario × task over steps · ROC per scenario for each
                  task + best-F1 threshold table · gate weights per CGC level · mixing weights ·
                  samples/s over steps
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from msrec_dist.report import plots
from msrec_dist.report.load import Run, load_runs
from msrec_dist.report.page import Page, RunPart, Section, Table, write_page
from msrec_dist.report.stats import best_f1, roc_curve, thin_curve

IMAGE_DIR = "report"  # beside report.html


@dataclass
class Canvas:
    """Where PNGs go, and the names already used (each file name once per report)."""
    out: str
    used: set[str] = field(default_factory=set)

    def path(self, stem: str) -> tuple[str, str]:
        """A fresh file name for `stem` → (absolute path, path relative to report.html)."""
        name, n = _slug(stem), 1
        while name in self.used:
            n += 1
            name = f"{_slug(stem)}-{n}"
        self.used.add(name)
        rel = f"{IMAGE_DIR}/{name}.png"
        return os.path.join(self.out, IMAGE_DIR, f"{name}.png"), rel


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "run"


def fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _cell(metrics: dict | None, scenario: str, task: str, key: str = "auc") -> float | None:
    """METRICS[scenario or "overall"][task][key], None where absent."""
    if not metrics:
        return None
    block = metrics.get("overall") if scenario == "overall" else (metrics.get("per_scenario") or {}).get(scenario)
    value = ((block or {}).get(task) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def mean_auc(metrics: dict | None) -> float | None:
    """Mean AUC over the defined scenario × task cells (final_metrics' per_scenario)."""
    values = [c.get("auc") for tasks in ((metrics or {}).get("per_scenario") or {}).values()
              for c in tasks.values() if isinstance(c, dict)]
    values = [v for v in values if isinstance(v, (int, float))]
    return float(np.mean(values)) if values else None


def _unavailable(run: Run, *artifacts: str, default: str) -> str:
    """'not available: <why>' from the notes of the artifacts the section needs."""
    why = [run.notes[a] for a in artifacts if a in run.notes]
    return "not available: " + ("; ".join(why) if why else default)


def loss_section(run: Run, canvas: Canvas) -> Section:
    section = Section("Loss")
    rows = [e for e in run.train if "loss" in e]
    if not rows:
        section.missing = _unavailable(run, "train_log.jsonl", default="no loss lines in train_log.jsonl")
        return section
    val_logloss = {task: [_cell(v["val"], "overall", task, "logloss") for v in run.val] for task in run.task_names()
                   } if run.val else {}
    path, rel = canvas.path(f"{run.label}-loss")
    plots.loss_curves([e["step"] for e in rows], [e["loss"] for e in rows], [v["step"] for v in run.val],
                      val_logloss, path)
    section.images.append(rel)
    section.note = ("train loss: the task-weighted sum of the tasks' mean binary cross-entropy over the "
                    "global batch, every train.log_every steps")
    return section


def selected_step(run: Run) -> int | None:
    """The step whose weights were evaluated: final_metrics' selection, else the last best val line."""
    selection = (run.final or {}).get("selection")
    if isinstance(selection, dict) and isinstance(selection.get("step"), int):
        return selection["step"]
    best = [v["step"] for v in run.val if v.get("best")]
    return best[-1] if best else None


def val_section(run: Run, canvas: Canvas) -> Section:
    section = Section("Validation AUC over training")
    if not run.val:
        section.missing = _unavailable(run, "train_log.jsonl", default=(
            "no val evaluations in train_log.jsonl (no val split, train.eval_every=0, or a run from before "
            "val evaluation)"))
        return section
    scenarios, tasks = run.scenario_names(), run.task_names()
    auc = {task: {name: [_cell(v["val"], name, task) for v in run.val] for name in scenarios + ["overall"]}
           for task in tasks}
    best = selected_step(run)
    path, rel = canvas.path(f"{run.label}-val_auc")
    plots.val_auc_curves([v["step"] for v in run.val], auc, best, path)
    section.images.append(rel)
    metric = run.val[-1].get("metric", "score")
    section.tables.append(Table(
        header=["step", "epoch", metric, "best so far"] + [f"{s}/{t} AUC" for s in scenarios for t in tasks],
        rows=[[fmt(v["step"]), fmt(v.get("epoch")), fmt(v.get("score")), fmt(bool(v.get("best")))]
              + [fmt(_cell(v["val"], s, t)) for s in scenarios for t in tasks] for v in run.val]))
    if best is not None:
        section.note = f"dotted line: the selected step {best} (its weights scored the eval split)"
    return section


def roc_section(run: Run, canvas: Canvas) -> Section:
    section = Section("ROC and best-F1 threshold (eval split)")
    p = run.predictions
    if p is None:
        section.missing = _unavailable(run, "eval_predictions.npz", default="no eval_predictions.npz")
        return section
    curves: dict[str, dict] = {}
    table = Table(header=["scenario", "task", "rows", "positives", "AUC", "threshold", "F1", "precision", "recall"])
    groups = [(name, p.scenario == s) for s, name in enumerate(p.scenario_names)]
    groups.append(("overall", np.ones(len(p.scenario), dtype=bool)))
    for t, task in enumerate(p.task_names):
        curves[task] = {}
        for name, rows in groups:
            scores, labels = p.scores[rows, t], p.labels[rows, t]
            roc, f1 = roc_curve(scores, labels), best_f1(scores, labels)
            point = None
            if roc is not None:
                if f1 is not None:  # the ROC point of the best-F1 threshold
                    k = int(np.searchsorted(-roc.thresholds, -f1.threshold))
                    point = (float(roc.fpr[k + 1]), float(roc.tpr[k + 1]))
                fpr, tpr = thin_curve(roc.fpr, roc.tpr)
                curves[task][name] = (fpr, tpr, roc.auc, point)
            table.rows.append([name, task, fmt(int(rows.sum())), fmt(int((labels > 0.5).sum())),
                               fmt(roc.auc if roc else None)]
                              + ([fmt(f1.threshold), fmt(f1.f1), fmt(f1.precision), fmt(f1.recall)] if f1
                                 else ["n/a"] * 4))
    if any(curves.values()):
        path, rel = canvas.path(f"{run.label}-roc")
        plots.roc_curves({t: c for t, c in curves.items() if c}, path)
        section.images.append(rel)
    else:
        section.note = "no scenario × task cell has both classes: no ROC curve"
    section.tables.append(table)
    section.note = "; ".join(filter(None, [section.note, "threshold: the score (probability) at or above which "
                                           "a row is called positive, chosen to maximise F1 in each cell"]))
    return section


def _weights_part(run: Run, section: Section, key: str, what: str) -> dict | None:
    """model_weights.json's `key` entry, or None with the section marked not available."""
    if run.weights is None:
        section.missing = _unavailable(run, "model_weights.json", default="no model_weights.json")
        return None
    part = run.weights.get(key)
    if not part:
        section.missing = f"not available: the model ({run.model or 'unknown'}) has no {what}"
        return None
    return part


def gates_section(run: Run, canvas: Canvas) -> Section:
    section = Section("Gate weights of the CGC levels (eval split)")
    gates = _weights_part(run, section, "gates", "CGC gates")
    if gates is None:
        return section
    scenarios = run.weights.get("scenario_names") or run.scenario_names()
    for level, entry in gates.items():
        rows = [w if w is not None else [[np.nan] * len(entry["expert_names"])] * len(entry["gate_names"])
                for w in entry["weights"]]
        weights = np.array(rows, dtype=np.float64)  # [S, G, E]
        names = scenarios if len(scenarios) == weights.shape[0] else [f"scenario {i}" for i in range(weights.shape[0])]
        path, rel = canvas.path(f"{run.label}-gates-{level}")
        plots.gate_heatmaps(level, weights, names, entry["gate_names"], entry["expert_names"], path)
        section.images.append(rel)
    section.note = ("mean softmax weight each gate gives each expert over the rows of a scenario; a task gate "
                    "sees only its own task's experts and the shared ones (0 elsewhere); grey: no rows")
    return section


def mixing_section(run: Run, canvas: Canvas) -> Section:
    section = Section("Balanced mixing weights")
    mixing = _weights_part(run, section, "mixing", "balanced mixing")
    if mixing is None:
        return section
    scenarios = run.weights.get("scenario_names") or run.scenario_names()
    tasks = run.weights.get("task_names") or run.task_names()
    path, rel = canvas.path(f"{run.label}-mixing")
    plots.mixing_heatmaps(mixing, scenarios, tasks, path)
    section.images.append(rel)
    section.note = ("row d: the weights of the scenario (task) experts in d's mix, σ(θ_d) on the diagonal; "
                    "scales: how much the scenario mix and the task mix add to each task's input")
    return section


def throughput_section(run: Run, canvas: Canvas) -> Section:
    section = Section("Samples/s over the run")
    rows = [e for e in run.train if isinstance(e.get("samples_per_s"), (int, float))]
    if not rows:
        section.missing = _unavailable(run, "train_log.jsonl", default="no samples_per_s in train_log.jsonl")
        return section
    path, rel = canvas.path(f"{run.label}-samples_per_s")
    plots.throughput([e["step"] for e in rows], [e["samples_per_s"] for e in rows], path)
    section.images.append(rel)
    if run.final and isinstance(run.final.get("train_samples_per_s"), (int, float)):
        section.note = f"whole run: {fmt(float(run.final['train_samples_per_s']), 1)} samples/s (final_metrics.json)"
    return section


RUN_SECTIONS: list[Callable[[Run, Canvas], Section]] = [loss_section, val_section, roc_section, gates_section,
                                                        mixing_section, throughput_section]


def summary_table(runs: list[Run]) -> Table:
    table = Table(header=["run", "model", "steps", "train samples", "wall s", "train samples/s", "selected",
                          "mean eval AUC", "directory"])
    for run in runs:
        f = run.final or {}
        selection = f.get("selection")
        chosen = (f"{selection.get('metric')} {fmt(selection.get('score'))} at step {selection.get('step')}"
                  if isinstance(selection, dict) else "last step" if run.final else "n/a")
        table.rows.append([run.label, run.model or "n/a", fmt(f.get("steps")), fmt(f.get("train_samples")),
                           fmt(f.get("wall_s"), 1), fmt(f.get("train_samples_per_s"), 1), chosen,
                           fmt(mean_auc(run.final)), run.path])
    return table


def comparison_section(runs: list[Run], canvas: Canvas) -> Section:
    section = Section("Eval AUC per scenario × task across runs")
    with_final = [r for r in runs if r.final]
    if not with_final:
        section.missing = "not available: no run has final_metrics.json"
        return section
    cells: list[tuple[str, str]] = []
    for run in with_final:
        for scenario in run.scenario_names() + ["overall"]:
            for task in run.task_names():
                if (scenario, task) not in cells:
                    cells.append((scenario, task))
    labels = [f"{s}/{t}" for s, t in cells]
    values = {run.label: [_cell(run.final, s, t) for s, t in cells] for run in with_final}
    path, rel = canvas.path("eval_auc")
    plots.eval_auc_bars(labels, values, path)
    section.images.append(rel)
    section.tables.append(Table(header=["run"] + labels,
                                rows=[[label] + [fmt(v) for v in vs] for label, vs in values.items()]))
    left_out = [r.label for r in runs if not r.final]
    if left_out:
        section.note = "not available for " + ", ".join(left_out) + " (no final_metrics.json)"
    return section


def build_report(run_dirs: list[str], out: str | None = None) -> str:
    """Writes <out>/report.html and <out>/report/*.png (out: the first run directory); returns the
    page's path. NotARunDir (naming the path) where a path is no run directory."""
    runs = load_runs(run_dirs)
    out = os.path.abspath(out or run_dirs[0])
    os.makedirs(os.path.join(out, IMAGE_DIR), exist_ok=True)
    for old in glob.glob(os.path.join(out, IMAGE_DIR, "*.png")):  # a previous report's plots
        os.remove(old)
    canvas = Canvas(out)
    page = Page(title="Run report: " + ", ".join(r.label for r in runs), summary=summary_table(runs),
                comparison=comparison_section(runs, canvas),
                runs=[RunPart(run.label, run.path, [make(run, canvas) for make in RUN_SECTIONS]) for run in runs])
    return write_page(page, os.path.join(out, "report.html"))
