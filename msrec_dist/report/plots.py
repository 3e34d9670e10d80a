"""The report's PNGs, drawn on matplotlib's Agg canvas (Figure + FigureCanvasAgg: no pyplot, so
no global backend or figure state). Each function takes plain lists / arrays and writes one file.

    loss_curves       train loss over steps | val logloss (overall) per task over steps
    val_auc_curves    one panel per task: val AUC per scenario (+ overall) over steps, best step marked
    throughput        samples/s over steps
    eval_auc_bars     eval AUC per scenario × task cell, one bar per run
    roc_curves        one panel per task: ROC per scenario (+ overall), the best-F1 point marked
    gate_heatmaps     one panel per gate of a CGC level: mean weight per scenario (rows) × expert (columns)
    mixing_heatmaps   BalancedMixing: scenario mixing matrix [S, S], task mixing matrix [T, T], scales [2, T]
"""
from __future__ import annotations

import math
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = Sequence[float | None]  # a None is a gap (undefined value)
DPI = 100


def _figure(panels: int, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * panels, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, dpi=DPI)
    return path


def _values(series: Series) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in series], dtype=np.float64)


def loss_curves(steps: Sequence[int], loss: Series, val_steps: Sequence[int], val_logloss: dict[str, Series],
                path: str) -> str:
    """Train loss (the task-weighted sum of mean BCEs) and, where val lines exist, val logloss per task."""
    fig, axes = _figure(2 if val_logloss else 1)
    ax = axes[0]
    if steps:
        ax.plot(steps, _values(loss), lw=1.2, color="tab:blue")
    ax.set(title="train loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    if val_logloss:
        ax = axes[1]
        for task, series in val_logloss.items():
            ax.plot(val_steps, _values(series), marker="o", ms=3, lw=1.2, label=task)
        ax.set(title="val logloss (overall)", xlabel="step", ylabel="logloss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def val_auc_curves(steps: Sequence[int], auc: dict[str, dict[str, Series]], best_step: int | None, path: str) -> str:
    """auc: task → {scenario or "overall": AUC per val step}."""
    fig, axes = _figure(len(auc))
    for ax, (task, by_scenario) in zip(axes, auc.items()):
        for name, series in by_scenario.items():
            style = dict(color="black", ls="--") if name == "overall" else {}
            ax.plot(steps, _values(series), marker="o", ms=3, lw=1.2, label=name, **style)
        if best_step is not None:
            ax.axvline(best_step, color="grey", ls=":", lw=1, label=f"selected (step {best_step})")
        ax.set(title=f"val AUC: {task}", xlabel="step", ylabel="AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def throughput(steps: Sequence[int], samples_per_s: Series, path: str) -> str:
    fig, (ax,) = _figure(1, width=7.0)
    values = _values(samples_per_s)
    ax.plot(steps, values, lw=1.2, color="tab:green")
    finite = values[np.isfinite(values)]
    if finite.size:
        ax.axhline(float(np.median(finite)), color="grey", ls=":", lw=1, label=f"median {np.median(finite):,.0f}")
        ax.legend(fontsize=8)
    top = float(finite.max()) * 1.15 if finite.size and finite.max() > 0 else 1.0  # headroom over the line
    ax.set(title="training throughput (all ranks)", xlabel="step", ylabel="samples/s", ylim=(0, top))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def eval_auc_bars(cells: list[str], runs: dict[str, Series], path: str) -> str:
    """cells: "scenario/task" labels; runs: run label → AUC per cell (None: no bar, "n/a")."""
    width = max(6.0, 0.45 * len(cells) * max(1, len(runs)) + 2.0)
    fig, (ax,) = _figure(1, width=min(width, 24.0), height=4.2)
    x = np.arange(len(cells))
    bar = 0.8 / max(1, len(runs))
    all_values = np.concatenate([_values(v) for v in runs.values()]) if runs else np.array([])
    finite = all_values[np.isfinite(all_values)]
    low = max(0.0, math.floor((finite.min() - 0.02) * 50) / 50) if finite.size else 0.0
    for i, (label, series) in enumerate(runs.items()):
        values = _values(series)
        pos = x - 0.4 + bar * (i + 0.5)
        bars = ax.bar(pos, np.where(np.isfinite(values), values - low, 0.0), bar, bottom=low, label=label)
        for rect, v in zip(bars, values):
            text = f"{v:.3f}" if np.isfinite(v) else "n/a"
            ax.annotate(text, (rect.get_x() + rect.get_width() / 2, (v if np.isfinite(v) else low)),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                        rotation=90 if len(runs) > 2 else 0)
    ax.set_xticks(x, cells, rotation=30, ha="right", fontsize=8)
    top = min(1.0, float(finite.max()) + 0.04) if finite.size else 1.0
    ax.set(ylabel="eval AUC", ylim=(low, max(top, low + 0.05)), title="eval AUC per scenario × task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def roc_curves(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float, tuple[float, float] | None]]],
               path: str) -> str:
    """curves: task → {scenario or "overall": (fpr, tpr, auc, best-F1 point (fpr, tpr) or None)}."""
    fig, axes = _figure(len(curves), width=4.6, height=4.2)
    for ax, (task, by_scenario) in zip(axes, curves.items()):
        for name, (fpr, tpr, auc, best) in by_scenario.items():
            style = dict(color="black", ls="--") if name == "overall" else {}
            (line,) = ax.plot(fpr, tpr, lw=1.2, label=f"{name} (AUC {auc:.3f})", **style)
            if best is not None:
                ax.plot(*best, marker="o", ms=5, color=line.get_color())
        ax.plot([0, 1], [0, 1], color="lightgrey", lw=0.8)
        ax.set(title=f"ROC: {task} (dot: best-F1 threshold)", xlabel="false positive rate",
               ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _heatmap(ax, values: np.ndarray, rows: list[str], cols: list[str], title: str, vmin: float = 0.0,
             vmax: float = 1.0):
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: a scenario with no rows
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if v < vmin + 0.6 * (vmax - vmin) else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    return image


def gate_heatmaps(level: str, weights: np.ndarray, scenarios: list[str], gates: list[str], experts: list[str],
                  path: str) -> str:
    """weights [S, G, E] (NaN rows: scenario not seen); one panel per gate."""
    fig, axes = _figure(len(gates), width=max(3.2, 0.7 * len(experts) + 1.6), height=0.45 * len(scenarios) + 2.2)
    image = None
    for g, (ax, gate) in enumerate(zip(axes, gates)):
        image = _heatmap(ax, weights[:, g, :], scenarios if g == 0 else [""] * len(scenarios), experts,
                         f"{level}: gate {gate}")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="mean gate weight")
    return _save(fig, path)


def mixing_matrix(own: Sequence[float]) -> np.ndarray:
    """σ(θ) [K] → the [K, K] weights model/mixing.py applies: own on the diagonal, the rest shared
    evenly by the other K − 1 experts."""
    k = len(own)
    if k == 1:
        return np.ones((1, 1))
    a = np.asarray(own, dtype=np.float64)[:, None]
    eye = np.eye(k)
    return eye * a + (1 - eye) * (1 - a) / (k - 1)


def mixing_heatmaps(mixing: dict, scenarios: list[str], tasks: list[str], path: str) -> str:
    """Rows: the row's scenario (task); columns: the expert it draws from; scales: scenario / task mix per task."""
    fig, axes = _figure(3, width=4.0, height=0.45 * max(len(scenarios), len(tasks)) + 2.6)
    _heatmap(axes[0], mixing_matrix(mixing["scenario_own_weight"]), scenarios, [f"{s} expert" for s in scenarios],
             "scenario mixing (row: row's scenario)")
    _heatmap(axes[1], mixing_matrix(mixing["task_own_weight"]), tasks, [f"{t} expert" for t in tasks],
             "task mixing (row: task)")
    scales = np.array([mixing["scenario_scale"], mixing["task_scale"]], dtype=np.float64)  # [2, T]
    finite = scales[np.isfinite(scales)]
    low, top = (min(0.0, float(finite.min())), max(1.0, float(finite.max()))) if finite.size else (0.0, 1.0)
    image = _heatmap(axes[2], scales, ["scenario mix", "task mix"], tasks, "scale of each mix per task",
                     vmin=low, vmax=top)
    fig.colorbar(image, ax=axes, shrink=0.8, label="weight")
    return _save(fig, path)
