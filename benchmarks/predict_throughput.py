"""Batch prediction throughput: the exported program (fp32, int8 tables) against the training
model's own eval loop, on the same eval rows, side by side in one process.

    python -m benchmarks.predict_throughput [--models msrec msrec_full] [--batches 512 1024 2048 4096 8192]
                                            [--rounds 3] [--out benchmarks/results/predict_throughput]

Per model: a short run is trained on the benchmark data (benchmarks/perf_common.ensure_data) and
exported twice (fp32, int8). Then, per batch size and round, in turn:
    eval loop    msrec_dist.training.evaluate.evaluate: the run's DMP model, reader → forward →
                 per scenario × task metrics (what training does on val and eval)
    predict      msrec_dist.serving.predict.predict: reader → model.aoti.pt2 (the default) →
                 Parquet (row, scenario, p_<task>), fp32 and int8 tables; fp32 with --metrics
                 (the eval loop's work plus the Parquet); and both through model.pt2
Rows/s are over the whole pass (reading included, as a user runs it); the table gives medians
over rounds and the ratios of the medians. Targets (issue 31): fp32 predict >= 2x the eval loop,
int8 >= 0.9x fp32.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch loads (see benchmarks/perf_common.py)
    from msrec_dist.runtime import prepare_process

    prepare_process(0)

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

from benchmarks.perf_common import (CONFIGS, QUIET, ensure_data, git_commit, machine, machine_line, median, table,
                                    write_results)


def train_and_export(model: str, data: str, root: str) -> tuple[str, str, str]:
    """(run dir, fp32 export dir, int8 export dir) of a 40-step run of configs/<model>.yaml."""
    from msrec_dist.config import load_experiment
    from msrec_dist.distributed.context import init_distributed
    from msrec_dist.serving.export import export_run
    from msrec_dist.training.runner import run

    run_dir = os.path.join(root, model)
    cfg = load_experiment(os.path.join(CONFIGS, f"{model}.yaml"), data,
                          QUIET + (f"run.dir={run_dir}", "train.max_steps=40", "train.eval_every=0",
                                   "run.eval_predictions=false"))
    run(cfg, init_distributed())
    fp32, int8 = os.path.join(root, f"{model}_fp32"), os.path.join(root, f"{model}_int8")
    export_run(run_dir, fp32, "latest")
    export_run(run_dir, int8, "latest", quantize="int8")
    return run_dir, fp32, int8


def eval_state(run_dir: str, batch: int):
    """The run's TrainState (DMP, world of one) with its latest weights, and its config."""
    from msrec_dist.config import load_experiment
    from msrec_dist.data.schema import load_data_config
    from msrec_dist.distributed.checkpoint import latest_checkpoint, load_weights
    from msrec_dist.distributed.context import init_distributed
    from msrec_dist.distributed.model_parallel import build_train_state

    cfg = load_experiment(os.path.join(run_dir, "config.json"), None, (f"reader.batch_size={batch}",))
    data = load_data_config(cfg.data)
    ctx = init_distributed()
    state = build_train_state(cfg, data, ctx, 1)
    load_weights(latest_checkpoint(os.path.join(run_dir, "checkpoints")), state)
    return cfg, data, ctx, state


def time_eval_loop(cfg, data, ctx, state, batch: int) -> tuple[float, int]:
    from msrec_dist.data.reader import make_dataloader
    from msrec_dist.training.evaluate import evaluate

    reader = dataclasses.replace(cfg.reader, batch_size=batch)
    t0 = time.perf_counter()
    metrics = evaluate(state, make_dataloader(data, data.eval, reader, 0, 1), data, ctx)
    wall = time.perf_counter() - t0
    return wall, sum(c["n"] for c in metrics["overall"].values()) // len(metrics["overall"])


def time_predict(model_dir: str, program, data: str, batch: int, out: str, metrics: bool) -> tuple[float, int]:
    """Wall time of predict's pass over the split with the program loaded once before (as the
    eval loop's model is built once); the checks of the data config and the output are in it."""
    from msrec_dist.serving.predict import predict

    t0 = time.perf_counter()
    result = predict(model_dir, data, "eval", out, metrics=metrics, batch_size=batch, overwrite=True, program=program)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True) if os.path.isdir(out) else os.remove(out)
    return wall, result["rows"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["msrec", "msrec_full"])
    ap.add_argument("--batches", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="predict_throughput", help="results name under benchmarks/results")
    a = ap.parse_args(argv)
    data = ensure_data()
    root = tempfile.mkdtemp(prefix="predict_bench_")
    rows_out, payload = [], {"machine": machine(), "commit": git_commit(), "data": data, "rounds": a.rounds,
                             "results": {}}
    try:
        for model in a.models:
            from msrec_dist.serving.predict import load_program, read_manifest

            run_dir, fp32, int8 = train_and_export(model, data, root)
            programs = {(d, kind): load_program(d, read_manifest(d), kind) for d in (fp32, int8)
                        for kind in ("aoti", "export")}
            for batch in a.batches:
                cfg, data_cfg, ctx, state = eval_state(run_dir, batch)
                times: dict[str, list[float]] = {k: [] for k in ("eval_loop", "fp32", "int8", "fp32_metrics",
                                                                 "fp32_pt2", "int8_pt2")}
                n = 0
                for _ in range(a.rounds):  # interleaved: drift hits every variant alike
                    wall, n = time_eval_loop(cfg, data_cfg, ctx, state, batch)
                    times["eval_loop"].append(n / wall)
                    for key, model_dir, kind, with_metrics in (
                            ("fp32", fp32, "aoti", False), ("int8", int8, "aoti", False),
                            ("fp32_metrics", fp32, "aoti", True), ("fp32_pt2", fp32, "export", False),
                            ("int8_pt2", int8, "export", False)):
                        wall, rows = time_predict(model_dir, programs[model_dir, kind], data, batch,
                                                  os.path.join(root, "p.parquet"), with_metrics)
                        assert rows == n, (rows, n)
                        times[key].append(rows / wall)
                med = {k: median(v) for k, v in times.items()}
                payload["results"][f"{model}/{batch}"] = {"rows": n, "rows_per_s": times, "median": med}
                rows_out.append([model, batch] + [f"{med[k]:,.0f}" for k in
                                                  ("eval_loop", "fp32", "int8", "fp32_metrics", "fp32_pt2", "int8_pt2")]
                                + [f"{med['fp32'] / med['eval_loop']:.2f}", f"{med['int8'] / med['fp32']:.2f}",
                                   f"{med['fp32_metrics'] / med['eval_loop']:.2f}",
                                   f"{med['fp32_pt2'] / med['eval_loop']:.2f}", f"{med['int8_pt2'] / med['fp32_pt2']:.2f}"])
                print(rows_out[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    md = "\n".join([
        f"Machine: {machine_line(payload['machine'])}; commit {payload['commit']}",
        "",
        "Command: `python -m benchmarks.predict_throughput " + " ".join(
            ["--models", *a.models, "--batches", *map(str, a.batches), "--rounds", str(a.rounds)]) + "`",
        "",
        f"Rows/s over the eval split of the benchmark data ({n:,} rows, reading included), median of "
        f"{a.rounds} interleaved rounds; eval loop = the training model's evaluate() (DMP, metrics); "
        "fp32 / int8 = python -m msrec_dist.predict through model.aoti.pt2 (the default where the export "
        "has it) writing Parquet, fp32 or int8 tables; fp32+metrics = the same with --metrics; "
        "pt2 = through model.pt2 (torch.export's program, run by its graph module).",
        "",
        table(["model", "batch", "eval loop", "fp32", "int8", "fp32+metrics", "fp32 pt2", "int8 pt2", "fp32 / eval",
               "int8 / fp32", "fp32+metrics / eval", "fp32 pt2 / eval", "int8 pt2 / fp32 pt2"], rows_out),
    ])
    js, md_path = write_results(a.out, payload, md)
    print(md)
    print(f"wrote {js} and {md_path}")


if __name__ == "__main__":
    main()
