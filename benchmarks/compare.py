"""Quality comparison: all five models of the zoo on one data set, beside the oracle AUC.

    python -m benchmarks.compare --data data/demo/data.yaml [--seeds 0 1 2] [--set train.epochs=2]

Trains each config in configs/ (msrec, shared_bottom, mmoe, ple, star) in this process
(a world of one; each run goes through DistributedModelParallel like any other), evaluates on
the eval split, and writes benchmarks/results/compare.json and compare.md: AUC per scenario ×
task (mean over seeds) with the oracle AUC of the true probabilities in the eval files.
"""
from __future__ import annotations

from msrec_dist.runtime import prepare_process

if __name__ == "__main__":  # run as a program: the process settings, before torch loads (below)
    prepare_process(reader_workers=0)  # as train.py does for the configs' in-process reader

import argparse  # noqa: E402
import json  # noqa: E402
import os
import shutil  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from msrec_dist.config import load_experiment  # noqa: E402
from msrec_dist.data.schema import load_data_config  # noqa: E402
from msrec_dist.data.synth import oracle_auc  # noqa: E402
from msrec_dist.distributed.context import init_distributed  # noqa: E402
from msrec_dist.training.runner import run  # noqa: E402

MODELS = ["msrec", "shared_bottom", "mmoe", "ple", "star"]
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def oracle_table(data_path: str) -> dict:
    data = load_data_config(data_path)
    return {
        "overall": {t: oracle_auc(data.eval, t) for t in data.task_names},
        "per_scenario": {s: {t: oracle_auc(data.eval, t, i) for t in data.task_names}
                         for i, s in enumerate(data.scenario.names)},
    }


def train_models(data_path: str, models: list[str], seeds: list[int], overrides: list[str],
                 run_root: str) -> dict:
    """{model: [final metrics of each seed]}; needs an initialised process group."""
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


def mean_auc(runs: list[dict], scenario: str | None, task: str) -> float:
    cells = [r["overall"][task] if scenario is None else r["per_scenario"][scenario][task] for r in runs]
    return statistics.fmean(c["auc"] for c in cells)


def markdown(results: dict, oracle: dict, seeds: list[int]) -> str:
    tasks = list(oracle["overall"])
    scenarios = list(oracle["per_scenario"]) + ["overall"]
    head = "| model | " + " | ".join(f"{s} {t}" for s in scenarios for t in tasks) + " | samples/s |"
    lines = [f"AUC on the eval split, mean over seeds {seeds}.", "", head, "|" + "---|" * (2 + len(scenarios) * len(tasks))]
    for model, runs in results.items():
        cells = [f"{mean_auc(runs, None if s == 'overall' else s, t):.4f}" for s in scenarios for t in tasks]
        speed = statistics.fmean(r["train_samples_per_s"] for r in runs)
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {speed:,.0f} |")
    ocells = [f"{(oracle['overall'] if s == 'overall' else oracle['per_scenario'][s])[t]:.4f}"
              for s in scenarios for t in tasks]
    lines.append("| oracle (true p) | " + " | ".join(ocells) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="benchmarks/results/compare")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as run_root:
        results = train_models(a.data, a.models, a.seeds, a.overrides, run_root)
    oracle = oracle_table(a.data)
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    table = markdown(results, oracle, a.seeds)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(f"{a.out}.json", "w") as f:
        json.dump({"machine": machine, "data": a.data, "seeds": a.seeds, "overrides": a.overrides,
                   "oracle": oracle, "runs": results}, f, indent=2)
    with open(f"{a.out}.md", "w") as f:
        f.write(f"Machine: {machine}\n\nCommand: python -m benchmarks.compare --data {a.data}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
