"""The trainer's samples/s and peak memory as its work grows: table rows, scenarios, tasks.

    python -m benchmarks.scale [--rows 100000 1000000 10000000 50000000] [--scenarios 3 10 30]
                               [--tasks 2 4 6] [--model msrec] [--batch 1024] [--warmup 5]
                               [--steps 120] [--chunks 12] [--quick] [--name scale]

Three sweeps from one base point (the smallest of --rows, 3 scenarios, 2 tasks):
  rows       one big table ("big", dim 16, row-wise Adagrad, the feature user_id) of 1e5 → 5e7 rows;
  scenarios  3 → 30 at the base rows and tasks;
  tasks      2 → 6 at the base rows and scenarios.
The base point runs first and again last (the second run shows how far the machine drifted).

Data: a Parquet file per point written here with pyarrow (not msrec_dist.data.synth, which has
two tasks): user_id Zipf(1.1)-distributed over the big table's rows, the ranks spread over the
table by a multiplicative hash (id = rank × 1000003 mod rows) so popular rows are not neighbours;
item_id Zipf over 10k rows, item_category (50), a history list over the item table (0..20 ids),
dense d0..d3, scenario shares as synth's, task labels Bernoulli.

Each point runs in a fresh subprocess (`--point`), one at a time: the same process settings as
the other entry points (prepare_process), build_train_state in a world of one (the planner: with
replicate_max_mb 1 MB every table above 1 MB — the big table at every size — is model-parallel
table_wise with fbgemm's fused row-wise Adagrad), the first warmup + steps batches read by the
real reader into memory, `--warmup` steps, then `--steps` steps of perf_common.step_fn (the
trainer's train_step) timed in `--chunks` chunks. samples/s = the fastest chunk (other jobs on the
machine only ever slow a chunk down); the median chunk is reported too. Peak RSS = the child's
VmHWM (/proc/self/status) after the timed steps; page faults from getrusage; model FLOPs per sample
(forward + backward, torch's counter: train_throughput.flops_per_sample) after them.
Table + optimizer-state bytes: every table's fp32 weights plus row-wise Adagrad's one fp32 per row
(computed, and checked against the tensors the state holds).

Targets: samples/s at the largest rows ≥ 0.7 × the base point's (the faster of its two runs); at
the base and rows points peak RSS ≤ 1.3 × (table + optimizer-state bytes) + overhead, overhead :=
the base point's peak RSS minus its table + optimizer-state bytes (the interpreter, torch, fbgemm,
the dense model, batches; the larger of its two runs). Scenarios and tasks grow the dense model,
not the table: their points report RSS growth next to the dense parameters' bytes.
Writes benchmarks/results/<name>.json and .md (`--name`, default scale; `--out-dir`).
"""
from __future__ import annotations

from msrec_dist.runtime import prepare_process

if __name__ == "__main__":  # run as a program: the process settings, before torch loads (below)
    prepare_process(reader_workers=0)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 16
ITEMS = 10_000
CATEGORIES = 50
HASH = 1_000_003  # prime, coprime with every size of the sweep (2^a 5^b)
MACHINE = "2-core x86-64 VM, torch 2.13.0+cpu"
RSS_FACTOR = 1.3
SPS_FACTOR = 0.7


# ---- data -------------------------------------------------------------------------------------

def zipf_ids(rng: np.random.Generator, n: int, rows: int, a: float = 1.1) -> np.ndarray:
    """n ids in 0..rows-1: Zipf(a) ranks (folded into the table), spread by a multiplicative hash."""
    rank = ((rng.zipf(a, n) - 1) % rows).astype(np.int64)
    return (rank * HASH) % rows  # a bijection of 0..rows-1 (HASH is prime and does not divide rows)


def write_data(out: str, rows: int, scenarios: int, tasks: int, n: int, seed: int = 0) -> str:
    """One Parquet file of n rows + data.yaml under out; returns the data.yaml path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from msrec_dist.data.synth import SynthSpec, scenario_names, scenario_props

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    hlen = rng.integers(0, 21, n)
    offsets = np.concatenate([[0], np.cumsum(hlen)]).astype(np.int32)
    hist = zipf_ids(rng, int(offsets[-1]), ITEMS)
    click = (rng.random(n) < 0.1).astype(np.int64)
    labels = {"click": click}
    for k in range(1, tasks):  # later tasks: a share of the clicks, as convert is
        labels[f"task{k}"] = click * (rng.random(n) < 0.3).astype(np.int64)
    cols = {
        "scenario": rng.choice(scenarios, n, p=scenario_props(scenarios, SynthSpec())).astype(np.int64),
        **labels,
        "user_id": zipf_ids(rng, n, rows),
        "item_id": zipf_ids(rng, n, ITEMS),
        "item_category": rng.integers(0, CATEGORIES, n).astype(np.int64),
        "hist_item_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(hist)),
        **{f"d{i}": rng.normal(size=n).astype(np.float32) for i in range(4)},
    }
    pq.write_table(pa.table(cols), os.path.join(out, "train", "part-00000.parquet"), row_group_size=16384)
    spec = {
        "train": "train/*.parquet",
        "scenario": {"column": "scenario", "names": scenario_names(scenarios)},
        "tasks": [{"name": name, "column": name} for name in labels],
        "sparse": [
            {"name": "user_id", "table": "big", "num_embeddings": rows, "dim": DIM},
            {"name": "item_id", "table": "item", "num_embeddings": ITEMS, "dim": DIM},
            {"name": "item_category", "table": "category", "num_embeddings": CATEGORIES, "dim": DIM},
            {"name": "hist_item_ids", "table": "item", "num_embeddings": ITEMS, "dim": DIM, "pooling": "mean"},
        ],
        "dense": [{"name": f"d{i}"} for i in range(4)],
    }
    path = os.path.join(out, "data.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path


# ---- one point (child process) ----------------------------------------------------------------

def proc_status() -> dict:
    """VmRSS / VmHWM of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def faults() -> tuple[int, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_majflt


def state_bytes(data) -> dict:
    """Computed bytes of every table's fp32 weights and its row-wise Adagrad state (1 fp32 per row)."""
    tables = {t.name: t for t in data.tables()}
    weights = sum(t.num_embeddings * t.dim * 4 for t in tables.values())
    opt = sum(t.num_embeddings * 4 for t in tables.values())
    return {"tables": {n: t.num_embeddings for n, t in tables.items()}, "weight_bytes": weights,
            "optimizer_bytes": opt, "total_bytes": weights + opt}


def held_bytes(state) -> dict:
    """Bytes of the tensors the state holds: table weights (local shards) and the sparse optimizer's state."""
    import torch

    def nbytes(v) -> int:
        if hasattr(v, "local_shards"):
            return sum(s.tensor.numel() * s.tensor.element_size() for s in v.local_shards())
        return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0

    from msrec_dist.distributed.model_parallel import table_name

    weights = sum(nbytes(v) for k, v in state.model.state_dict().items() if table_name(k))
    opt = 0
    for sd in state.model.fused_optimizer.state_dict()["state"].values():
        opt += sum(nbytes(v) for k, v in sd.items() if "momentum" in k or "sum" in k)
    if state.replicated_optimizer is not None:
        for sd in state.replicated_optimizer.state_dict()["state"].values():
            opt += sum(nbytes(v) for v in sd.values())
    return {"weight_bytes": weights, "optimizer_bytes": opt}


def run_point(data_path: str, model: str, batch: int, warmup: int, steps: int, chunks: int) -> dict:
    """Build the train state, time the steps; the figures of this process."""
    import torch

    from benchmarks import perf_common as P
    from msrec_dist.distributed.sharding import plan_to_json

    rss0 = proc_status()["VmRSS"]
    f0 = faults()
    t0 = time.perf_counter()
    cfg, data, _, state = P.make_state(model, data_path, batch, ("train.warmup_steps=1",))
    build_s = time.perf_counter() - t0
    f1 = faults()
    rss_built = proc_status()["VmRSS"]
    batches = P.prebuilt_batches(cfg, data, warmup + steps)
    if len(batches) < warmup + steps:
        raise RuntimeError(f"only {len(batches)} batches in the data, need {warmup + steps}")
    step = P.step_fn(state, cfg)
    t1 = time.perf_counter()
    for b in batches[:warmup]:
        step(b)
    warmup_s = time.perf_counter() - t1
    f2 = faults()
    per = max(1, steps // chunks)
    times = []
    timed = batches[warmup:warmup + per * chunks]
    for c in range(chunks):
        t = time.perf_counter()
        for b in timed[c * per:(c + 1) * per]:
            step(b)
        times.append(time.perf_counter() - t)
    f3 = faults()
    status = proc_status()  # before the FLOP count below, which runs one more forward + backward
    from benchmarks.train_throughput import flops_per_sample

    flops = flops_per_sample(state, batches[0])
    plan = {name: f"{p['sharding_type']} / {p['compute_kernel']}"
            for tables in plan_to_json(state.plan).values() for name, p in tables.items()}
    sps = sorted(per * batch / t for t in times)
    return {
        "samples_per_s": sps[-1], "samples_per_s_median_chunk": float(np.median(sps)),
        "chunk_samples_per_s": sps, "steps_per_chunk": per, "build_s": build_s, "warmup_s": warmup_s,
        "rss_start": rss0, "rss_after_build": rss_built, "rss_end": status["VmRSS"], "peak_rss": status["VmHWM"],
        "minor_faults_build": f1[0] - f0[0], "minor_faults_warmup": f2[0] - f1[0],
        "minor_faults_timed": f3[0] - f2[0], "major_faults": f3[1] - f0[1],
        "plan": plan, "computed": state_bytes(data), "held": held_bytes(state),
        "flops_per_sample": flops,
        "dense_param_bytes": sum(q.numel() * q.element_size() for q in state.dense_params),
        "torch_threads": torch.get_num_threads(),
    }


# ---- sweep (parent) ---------------------------------------------------------------------------

def spawn_point(rows: int, scenarios: int, tasks: int, a, tmp: str) -> dict:
    """Data for one point, then the point in a fresh `python -m benchmarks.scale --point` process."""
    n = (a.warmup + a.steps + 2) * a.batch
    data = write_data(os.path.join(tmp, f"r{rows}_s{scenarios}_t{tasks}"), rows, scenarios, tasks, n)
    cmd = [sys.executable, "-m", "benchmarks.scale", "--point", data, "--model", a.model, "--batch", str(a.batch),
           "--warmup", str(a.warmup), "--steps", str(a.steps), "--chunks", str(a.chunks)]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"point rows={rows} scenarios={scenarios} tasks={tasks} failed:\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res.update(rows=rows, scenarios=scenarios, tasks=tasks, wall_s=time.perf_counter() - t,
               children_maxrss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    print(f"rows={rows:>10,} scenarios={scenarios:>2} tasks={tasks}: {res['samples_per_s']:,.0f} samples/s "
          f"(median chunk {res['samples_per_s_median_chunk']:,.0f}), peak RSS {res['peak_rss'] / 2**20:,.0f} MiB, "
          f"table+state {res['computed']['total_bytes'] / 2**20:,.0f} MiB, build {res['build_s']:.1f} s", flush=True)
    return res


def sweep(a) -> dict:
    base_rows = min(a.rows)
    points: list[tuple[str, int, int, int]] = [("base", base_rows, 3, 2)]
    points += [("rows", r, 3, 2) for r in a.rows if r != base_rows]
    points += [("scenarios", base_rows, s, 2) for s in a.scenarios if s != 3]
    points += [("tasks", base_rows, 3, t) for t in a.tasks if t != 2]
    points += [("base_again", base_rows, 3, 2)]
    out = []
    with tempfile.TemporaryDirectory(prefix="msrec_scale_") as tmp:
        for kind, r, s, t in points:
            res = spawn_point(r, s, t, a, tmp)
            res["sweep"] = kind
            out.append(res)
            # the point's data is no longer needed
            subprocess.run(["rm", "-rf", os.path.join(tmp, f"r{r}_s{s}_t{t}")], check=False)
    return evaluate(out, a)


def evaluate(points: list[dict], a) -> dict:
    base = [p for p in points if p["sweep"] in ("base", "base_again")]
    first = base[0]
    base_sps = max(p["samples_per_s"] for p in base)  # interference only slows a run down
    overhead = max(p["peak_rss"] - p["computed"]["total_bytes"] for p in base)
    for p in points:
        p["rss_bound"] = RSS_FACTOR * p["computed"]["total_bytes"] + overhead
        # the bound is the table's: it applies where only the table grows (scenarios and tasks
        # grow the dense model instead; their RSS growth is reported next to the dense bytes)
        p["rss_holds"] = p["peak_rss"] <= p["rss_bound"] if p["sweep"] in ("base", "rows", "base_again") else None
        p["rss_over_base"] = p["peak_rss"] - first["peak_rss"]
        p["dense_bytes_over_base"] = p["dense_param_bytes"] - first["dense_param_bytes"]
        p["sps_vs_base"] = p["samples_per_s"] / base_sps
    largest = max((p for p in points if p["sweep"] == "rows"), key=lambda p: p["rows"], default=first)
    return {
        "points": points, "base_samples_per_s": base_sps, "overhead_bytes": overhead,
        "targets": {
            "sps": {"rows": largest["rows"], "ratio": largest["sps_vs_base"], "need": SPS_FACTOR,
                    "holds": largest["sps_vs_base"] >= SPS_FACTOR},
            "rss": {"need": f"peak RSS <= {RSS_FACTOR} x (table + optimizer-state bytes) + overhead",
                    "holds": all(p["rss_holds"] is not False for p in points),
                    "fails": [p["rows"] for p in points if p["rss_holds"] is False]},
        },
        "settings": {"model": a.model, "batch": a.batch, "warmup": a.warmup, "steps": a.steps, "chunks": a.chunks,
                     "dim": DIM, "rows": a.rows, "scenarios": a.scenarios, "tasks": a.tasks},
    }


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def markdown(res: dict) -> str:
    from benchmarks.perf_common import table

    m, s, t = res["machine"], res["settings"], res["targets"]
    rows = []
    for p in res["points"]:
        big = p["plan"].get("big", "?")
        rows.append([p["sweep"], f"{p['rows']:,}", p["scenarios"], p["tasks"], mib(p["computed"]["total_bytes"]),
                     f"{p['samples_per_s']:,.0f}", f"{p['samples_per_s_median_chunk']:,.0f}",
                     f"{p['sps_vs_base']:.2f}", mib(p["peak_rss"]), mib(p["rss_bound"]),
                     {True: "yes", False: "**no**", None: "n/a"}[p["rss_holds"]], mib(p["rss_over_base"]),
                     f"{p['dense_param_bytes'] / 2**20:,.1f}", f"{p['flops_per_sample'] / 1e6:,.2f}", f"{p['build_s']:.1f}",
                     f"{p['minor_faults_build']:,}", f"{p['minor_faults_timed']:,}", big])
    head = ["sweep", "big table rows", "scenarios", "tasks", "table + opt. state MiB", "samples/s (best chunk)",
            "median chunk", "vs base", "peak RSS MiB", "RSS bound MiB", "RSS holds",
            "RSS over base MiB", "dense params MiB", "MFLOP / sample", "build s",
            "minor faults, build", "minor faults, timed", "big table: plan"]
    return "\n".join([
        "# Scale: samples/s and peak RSS as the table, scenarios and tasks grow",
        "",
        f"Machine: {m['label']}; {m['cpu_model']}, {m['cores']} cores, {m['torch_threads']} torch threads. "
        f"Commit {res['commit']}, {res['date']}. Other jobs shared the CPU during the run: samples/s are noisy "
        "(the base point runs first and last; compare within this file).",
        "",
        f"Command: `{res['command']}`. Model `{s['model']}`, batch {s['batch']}, 1 rank, {s['warmup']} warm-up "
        f"steps, then {s['steps']} timed steps in {s['chunks']} chunks; each point in a fresh process. "
        "samples/s = fastest chunk; peak RSS = the point process's VmHWM. The RSS bound is the table's: it is "
        "checked where only the table grows (n/a where scenarios or tasks grow the dense model instead; dense "
        "params MiB = its fp32 weights, which Adam's two moments and the gradient triple).",
        "",
        table(head, rows),
        "",
        f"Base samples/s (the faster of the base point's two runs): {res['base_samples_per_s']:,.0f}. "
        f"Fixed overhead (base peak RSS − its table + optimizer-state bytes, the larger of its two runs): "
        f"{mib(res['overhead_bytes'])} MiB.",
        "",
        f"- samples/s at {t['sps']['rows']:,} rows vs base: {t['sps']['ratio']:.2f} (target ≥ {t['sps']['need']}): "
        f"{'holds' if t['sps']['holds'] else 'fails'}",
        f"- {t['rss']['need']}: {'holds at every point' if t['rss']['holds'] else 'fails at rows ' + str(t['rss']['fails'])}",
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000, 50_000_000])
    ap.add_argument("--scenarios", type=int, nargs="+", default=[3, 10, 30])
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--model", default="msrec")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="small sizes and few steps (a smoke run)")
    ap.add_argument("--name", default="scale", help="results file name")
    ap.add_argument("--out-dir", default=None, help="where to write <name>.json / .md (default benchmarks/results)")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)  # child: data.yaml of one point
    a = ap.parse_args(argv)
    if a.point:
        print(json.dumps(run_point(a.point, a.model, a.batch, a.warmup, a.steps, a.chunks)), flush=True)
        return
    if a.quick:
        a.rows, a.scenarios, a.tasks, a.warmup, a.steps, a.chunks = [1000, 20000], [3, 4], [2, 3], 1, 2, 2
    res = sweep(a)
    from benchmarks import perf_common as P

    m = P.machine()
    m["label"] = MACHINE
    res.update(machine=m, commit=P.git_commit(), date=time.strftime("%Y-%m-%d"),
               command=" ".join(["python -m benchmarks.scale", *(argv if argv is not None else sys.argv[1:])]),
               note="other jobs shared the 2 CPU cores during the run")
    out_dir = a.out_dir or P.RESULTS
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{a.name}.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out_dir, f"{a.name}.md"), "w") as f:
        f.write(markdown(res) + "\n")
    print(markdown(res).split("\n\n")[-1])


if __name__ == "__main__":
    main()
