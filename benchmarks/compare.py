"""Quality comparison: the models of the zoo on one data set, each selected on val, over seeds.

    python -m benchmarks.compare --data DATA.yaml [--seeds 0 1 2] [--models msrec ple ...]
                                 [--set train.epochs=2] [--runs DIR] [--out benchmarks/results/compare]

Trains each config in configs/ (msrec, msrec_full with every block on, the baselines shared_bottom,
mmoe, ple, star, and the published m3oe and pepnet) in this process (a world of one; each run goes through
DistributedModelParallel like any other) with the same budget. Where the data has a val split,
every run evaluates on it (train.eval_every, the configs' default: each epoch) and the eval split
is scored with its best weights on val (checkpoints/best): the eval split chooses nothing. Writes
<out>.json and <out>.md: eval AUC per scenario × task, mean ± standard deviation over seeds, the
mean over the cells, the val score of the chosen step, and, where the eval files carry the true
probabilities (the synthetic data), the oracle AUC. The last lines check the targets: the first
model (msrec) has the best mean AUC, and on no cell is it below the best other model by more than
that model's standard deviation over seeds.
"""
from __future__ import annotations

from msrec_dist.runtime import prepare_process

if __name__ == "__main__":  # run as a program: the process settings, before torch loads (below)
    prepare_process(reader_workers=0)  # as train.py does for the configs' in-process reader

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from benchmarks.perf_common import git_commit  # noqa: E402
from msrec_dist.config import load_experiment  # noqa: E402
from msrec_dist.data.schema import load_data_config  # noqa: E402
from msrec_dist.data.synth import oracle_auc  # noqa: E402
from msrec_dist.distributed.context import init_distributed  # noqa: E402
from msrec_dist.training.runner import run  # noqa: E402

MODELS = ["msrec", "msrec_full", "shared_bottom", "mmoe", "ple", "star", "m3oe", "pepnet"]
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def oracle_table(data_path: str) -> dict | None:
    """The AUC of the true probabilities per cell, or None where the eval files have none."""
    data = load_data_config(data_path)
    names = set(pq.ParquetFile(data.eval[0]).schema_arrow.names)
    if not all(f"p_{t}" in names for t in data.task_names):
        return None
    return {
        "overall": {t: oracle_auc(data.eval, t) for t in data.task_names},
        "per_scenario": {s: {t: oracle_auc(data.eval, t, i) for t in data.task_names}
                         for i, s in enumerate(data.scenario.names)},
    }


def train_models(data_path: str, models: list[str], seeds: list[int], overrides: list[str],
                 run_root: str) -> dict:
    """{model: [final metrics of each seed]}; needs an initialised process group. Each run's
    directory is <run_root>/<model>_s<seed>."""
    results: dict[str, list[dict]] = {}
    for model in models:
        for seed in seeds:
            cfg = load_experiment(os.path.join(CONFIG_DIR, f"{model}.yaml"), data_path,
                                  tuple(overrides) + (f"run.seed={seed}", f"run.dir={run_root}/{model}_s{seed}",
                                                      "run.progress=false", "run.tensorboard=false"))
            # the comparison's own scratch runs: a rerun replaces them (run() refuses a used run.dir)
            shutil.rmtree(cfg.run.dir, ignore_errors=True)
            results.setdefault(model, []).append(run(cfg, init_distributed()))
    return results


def cells(results: dict) -> list[tuple[str, str]]:
    """The (scenario, task) cells of the runs, in the data's order."""
    first = next(iter(results.values()))[0]["per_scenario"]
    return [(s, t) for s, tasks in first.items() for t in tasks]


def cell_aucs(runs: list[dict], scenario: str, task: str) -> list[float]:
    return [r["per_scenario"][scenario][task]["auc"] for r in runs if r["per_scenario"][scenario][task]["auc"] is not None]


def summary(results: dict) -> dict:
    """Per model: per cell (mean, std over seeds), the mean over cells per seed (mean, std)."""
    out = {}
    for model, runs in results.items():
        per_cell = {}
        for s, t in cells(results):
            v = cell_aucs(runs, s, t)
            per_cell[f"{s}/{t}"] = (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
        seed_means = [statistics.fmean(a for s, t in cells(results)
                                       if (a := r["per_scenario"][s][t]["auc"]) is not None) for r in runs]
        out[model] = {"cells": per_cell, "mean_auc": (statistics.fmean(seed_means),
                                                      statistics.stdev(seed_means) if len(seed_means) > 1 else 0.0)}
    return out


def target_check(summ: dict, first: str) -> list[str]:
    """The targets for `first`: best mean AUC; on no cell below the best other by more than that
    model's std over seeds. One line per finding."""
    others = {m: v for m, v in summ.items() if m != first}
    if not others:
        return []
    lines = []
    best_other = max(others, key=lambda m: others[m]["mean_auc"][0])
    mine = summ[first]["mean_auc"][0]
    verdict = "met" if mine > others[best_other]["mean_auc"][0] else "NOT met"
    lines.append(f"- best mean AUC: {first} {mine:.4f} vs best other {best_other} "
                 f"{others[best_other]['mean_auc'][0]:.4f}: {verdict}")
    for cell, (value, _) in summ[first]["cells"].items():
        rival = max(others, key=lambda m: others[m]["cells"][cell][0])
        r_mean, r_std = others[rival]["cells"][cell]
        verdict = "met" if value >= r_mean - r_std else "NOT met"
        lines.append(f"- {cell}: {first} {value:.4f} vs best other {rival} {r_mean:.4f} ± {r_std:.4f}: {verdict}")
    return lines


def markdown(results: dict, oracle: dict | None, seeds: list[int]) -> str:
    summ = summary(results)
    names = [f"{s} {t}" for s, t in cells(results)]
    head = "| model | " + " | ".join(names) + " | mean AUC | val score (step) | samples/s |"
    lines = [f"AUC on the eval split, mean ± std over seeds {seeds}; each run's weights chosen on val.", "",
             head, "|" + "---|" * (len(names) + 4)]
    for model, runs in results.items():
        row = [f"{m:.4f} ± {sd:.4f}" for m, sd in summ[model]["cells"].values()]
        sel = [r["selection"] for r in runs if r.get("selection")]
        val = (f"{statistics.fmean(x['score'] for x in sel):.4f} ({', '.join(str(x['step']) for x in sel)})"
               if sel else "n/a (no val split)")
        speed = statistics.fmean(r["train_samples_per_s"] for r in runs)
        mean, sd = summ[model]["mean_auc"]
        lines.append(f"| {model} | " + " | ".join(row) + f" | {mean:.4f} ± {sd:.4f} | {val} | {speed:,.0f} |")
    if oracle is not None:
        lines.append("| oracle (true p) | " + " | ".join(f"{oracle['per_scenario'][s][t]:.4f}" for s, t in cells(results))
                     + " | | | |")
    check = target_check(summ, next(iter(results)))
    if check:
        lines += ["", f"Targets for {next(iter(results))}:", *check]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--runs", default=None, help="keep the run directories here (default: a temporary directory)")
    ap.add_argument("--out", default="benchmarks/results/compare")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        results = train_models(a.data, a.models, a.seeds, a.overrides, a.runs or scratch)
    oracle = oracle_table(a.data)
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    table = markdown(results, oracle, a.seeds)
    command = "python -m benchmarks.compare " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(f"{a.out}.json", "w") as f:
        json.dump({"machine": machine, "commit": git_commit(), "data": a.data, "seeds": a.seeds, "overrides": a.overrides,
                   "oracle": oracle, "summary": summary(results), "runs": results}, f, indent=2)
    with open(f"{a.out}.md", "w") as f:
        f.write(f"Machine: {machine}; commit {git_commit()}\n\nCommand: `{command}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
