"""Steady-state training throughput of the model zoo on the synthetic data, 1 rank and 2 gloo ranks.

    python -m benchmarks.train_throughput [--models msrec ple ...] [--batch-sizes 512 1024 ...]
                                          [--steps 8] [--warmup 3] [--ranks 1 2] [--repeats 3] [--quick]

Per model (configs/<model>.yaml) and global batch B:
  1 rank   in this process (a world of one, torch's default threads), the real reader
           (config's workers), train_step as the runner calls it; warm-up steps excluded.
  2 ranks  `torchrun --standalone --nproc-per-node 2 -m benchmarks.train_throughput --worker`,
           local batch B/2 each (same global batch), gloo, 1 thread per rank (torchrun's default).
  The two grids run alternately `--repeats` times (1, 2, 2, 1, 1, 2, ...) and each cell keeps its
  fastest run: this machine's speed drifts by 10-20% over minutes, which a single pass of each
  grid, minutes apart, would put into the 2-rank / 1-rank ratios. Every run is in the JSON.
Also, per model: the time split of one step (torch.profiler; record_function regions put
around sub-modules by forward hooks, none in model code): reader / embedding lookup /
attention / STAR / PLE / mixing / towers+loss / backward (incl. the fused sparse optimizer) /
optimizer (clip + dense Adam + schedule); model FLOPs per sample (torch FlopCounterMode over
forward + backward) and the share of this machine's fp32 matmul FLOP/s (measured in this run)
that the achieved samples/s represents.
Writes benchmarks/results/train_throughput.json and .md.
"""
from __future__ import annotations

from msrec_dist.runtime import prepare_process

if __name__ == "__main__":  # run as a program: the process settings, before torch loads (below)
    prepare_process(reader_workers=0)  # as train.py does for the configs' in-process reader

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import perf_common as P  # noqa: E402

BATCH_SIZES = [512, 1024, 2048, 4096, 8192]
REGIONS = {  # sub-module (of MultiScenarioModel) → region name
    "embedding": "embedding lookup", "attention": "attention", "trunk": "STAR / bottom",
    "aux": "STAR / bottom", "experts": "PLE", "mixing": "mixing", "towers": "towers",
}
SPLIT_ORDER = ["reader", "embedding lookup", "attention", "STAR / bottom", "PLE", "mixing", "towers",
               "loss + rest of forward", "backward", "optimizer"]


def inner_model(state):
    """The MultiScenarioModel inside DMP (and DDP)."""
    for _, m in state.model.named_modules():
        if type(m).__name__ == "MultiScenarioModel":
            return m
    raise RuntimeError("no MultiScenarioModel in the DMP")


def timed_steps(state, cfg, data, ctx, warmup: int, steps: int, loader=None) -> float:
    """Seconds per step over `steps` steps after `warmup`, real reader, barrier-synchronised."""
    from msrec_dist.data.reader import make_dataloader
    from msrec_dist.training.agreement import agreed_batches

    step = P.step_fn(state, cfg, ctx.world_size)
    loader = loader or make_dataloader(data, data.train, cfg.reader, ctx.rank, ctx.world_size)
    it = agreed_batches(loader, data, ctx)  # one agreement, then one step, per batch, as training
    for _ in range(warmup):
        batch, rows = next(it)
        step(batch, rows)
    if ctx.world_size > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        batch, rows = next(it)
        step(batch, rows)
    if ctx.world_size > 1:
        dist.barrier()
    elapsed = time.perf_counter() - start
    it.close()
    return elapsed / steps


def throughput_grid(models, batch_sizes, data_path, warmup, steps, ctx, paths: dict | None = None) -> dict:
    """{model: {B: samples/s}} of this world (local batch B / world_size); `paths` gets
    {model: {host_reduce, local_lookup}}: how the runs summed and looked up."""
    out: dict = {}
    for model in models:
        for B in batch_sizes:
            cfg, data, ctx, state = P.make_state(model, data_path, B // ctx.world_size, ctx=ctx)
            if paths is not None:
                paths[model] = {"host_reduce": state.host_reduce, "local_lookup": state.local_lookup}
            sec = timed_steps(state, cfg, data, ctx, warmup, steps)
            out.setdefault(model, {})[B] = B / sec
            if ctx.is_main:
                print(f"[{ctx.world_size} rank(s), {torch.get_num_threads()} threads] {model} B={B}: "
                      f"{B / sec:,.0f} samples/s ({sec * 1e3:.1f} ms/step)", flush=True)
            del state
    return out


def within_round_ratios(res: dict) -> dict:
    """{model: {B: median over rounds of (2-rank samples/s / 1-rank samples/s) of that round}}, or
    {} without per-round runs."""
    ones, twos = res.get("one_rank_runs", []), res.get("two_ranks_runs", [])
    if not ones or len(ones) != len(twos):
        return {}
    return {m: {str(b): P.median([t[m][str(b)] / o[m][str(b)] for o, t in zip(ones, twos)])
                for b in res["batch_sizes"]} for m in res["models"]}


def fastest_cells(grids: list[dict]) -> dict:
    """{model: {B: samples/s}} with each cell's highest value over the runs."""
    return {mo: {b: max(g[mo][b] for g in grids) for b in grids[0][mo]} for mo in grids[0]}


def flops_per_sample(state, batch) -> float:
    """FLOPs of forward + backward of one batch (matmuls, convs, ...; torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = state.model(batch)
        loss.backward()
    state.dense_optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch.size


def step_split(model: str, data_path: str, batch_size: int, steps: int = 3) -> dict:
    """Milliseconds per step in each region (torch.profiler, `steps` profiled steps after warm-up)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    from msrec_dist.data.reader import make_dataloader

    cfg, data, _, state = P.make_state(model, data_path, batch_size)
    net = inner_model(state)
    handles, open_regions = [], {}
    for attr, region in REGIONS.items():
        mod = getattr(net, attr, None)
        if mod is None:
            continue

        def pre(m, args, region=region):
            rf = record_function(region)
            rf.__enter__()
            open_regions[id(m)] = rf

        def post(m, args, out):
            open_regions.pop(id(m)).__exit__(None, None, None)
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    from msrec_dist.training.step import DenseStep
    dense = DenseStep(state, cfg.train.grad_clip)

    def one_step(it):
        with record_function("reader"):
            batch = next(it)
        state.model.train()
        with record_function("forward"):
            loss, _ = state.model(batch)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            dense.step()

    it = iter(make_dataloader(data, data.train, cfg.reader))
    for _ in range(3):
        one_step(it)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            one_step(it)
        wall = (time.perf_counter() - start) / steps
    for h in handles:
        h.remove()
    totals = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages()
              if e.key in set(REGIONS.values()) | {"reader", "forward", "backward", "optimizer"}}
    split = {r: totals.get(r, 0.0) for r in SPLIT_ORDER if r != "loss + rest of forward"}
    split["loss + rest of forward"] = totals.get("forward", 0.0) - sum(
        totals.get(r, 0.0) for r in set(REGIONS.values()))
    return {"batch_size": batch_size, "ms": {r: split[r] for r in SPLIT_ORDER},
            "profiled_step_ms": wall * 1e3}


def two_rank_grid(models, batch_sizes, data_path, warmup, steps) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "two_ranks.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "benchmarks.train_throughput", "--worker", out, "--data", data_path,
               "--warmup", str(warmup), "--steps", str(steps), "--models", *models,
               "--batch-sizes", *map(str, batch_sizes)]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        proc = subprocess.run(cmd, cwd=P.REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"2-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print("\n".join(ln for ln in proc.stdout.splitlines() if "samples/s" in ln), flush=True)
        with open(out) as f:
            payload = json.load(f)
    return payload


def worker(a) -> None:
    """One rank of the 2-rank measurement (started by torchrun)."""
    ctx = P.init_world()
    paths: dict = {}
    grid = throughput_grid(a.models, a.batch_sizes, a.data, a.warmup, a.steps, ctx, paths)
    if ctx.is_main:
        with open(a.worker, "w") as f:
            json.dump({"threads_per_rank": torch.get_num_threads(), "world_size": ctx.world_size,
                       "samples_per_s": grid, "paths": paths}, f)
    dist.barrier()
    dist.destroy_process_group()


def markdown(res: dict, command: str) -> str:
    m = res["machine"]
    lines = ["# Training throughput (CPU)", "",
             f"Machine: {P.machine_line(m)}", "", f"Command: `{command}`", "",
             f"Data: synthetic ({res['rows']} train rows, msrec_dist.data.synth seed 0). Steady state: "
             f"{res['warmup']} warm-up steps excluded, {res['steps']} timed steps, real Parquet reader "
             f"(config's workers); the 1-rank and 2-rank grids ran alternately {res.get('repeats', 1)} times "
             f"and each cell shows its fastest run. fp32 matmul (1024³, {m['torch_threads']} threads) in this run: "
             f"{res['matmul_gflops']:.1f} GFLOP/s.", ""]
    one, two = res["one_rank"], res.get("two_ranks", {}).get("samples_per_s", {})
    bs = res["batch_sizes"]
    within = within_round_ratios(res) if two else {}
    head = ["model", "ranks"] + [f"B={b}" for b in bs]
    rows = []
    for model in res["models"]:
        rows.append([model, f"1 ({m['torch_threads']} threads)"] + [f"{one[model][str(b)]:,.0f}" for b in bs])
        if two:
            rows.append([model, "2 gloo (1 thread each)"] + [f"{two[model][str(b)]:,.0f}" for b in bs])
            rows.append([model, "2 ranks / 1 rank"] + [f"{two[model][str(b)] / one[model][str(b)]:.2f}" for b in bs])
            if within:
                rows.append([model, "median of the rounds' ratios"] + [f"{within[model][str(b)]:.2f}" for b in bs])
    lines += ["## Samples/s (global batch B; 2 ranks: B/2 per rank)", "", P.table(head, rows), ""]
    if two:
        paths = res["two_ranks"].get("paths", {})
        if paths:
            def said(key):
                on = [mo for mo in res["models"] if paths.get(mo, {}).get(key)]
                return "all models" if len(on) == len(res["models"]) else (", ".join(on) or "none")
            lines += [f"2 ranks: a gloo process group; the loop's sums through shared memory "
                      f"(`train.host_reduce`): {said('host_reduce')}; the embedding through the replicated "
                      f"tables' kernel (local lookup): {said('local_lookup')}.", ""]
        ratios = [two[mo][str(b)] / one[mo][str(b)] for mo in res["models"] for b in bs]
        lines += [f"Target 2 gloo ranks >= 0.8x 1 rank with 2 threads: met in "
                  f"{sum(r >= 0.8 for r in ratios)}/{len(ratios)} cells (min {min(ratios):.2f}, "
                  f"median {P.median(ratios):.2f}) best vs best."]
        if within:
            w = [within[mo][str(b)] for mo in res["models"] for b in bs]
            lines += [f"By the median of the ratios within each round (the two grids of a round run "
                      f"one after the other, so slow drift of the machine cancels): met in "
                      f"{sum(r >= 0.8 for r in w)}/{len(w)} cells (min {min(w):.2f}, median {P.median(w):.2f})."]
        lines += [""]
    fb = res["flops_batch"]
    rows = []
    for model in res["models"]:
        f = res["flops_per_sample"][model]
        best = max(bs, key=lambda b: one[model][str(b)])
        achieved = f * one[model][str(best)]
        rows.append([model, f"{f / 1e6:.2f}", f"{best}", f"{achieved / 1e9:.2f}",
                     f"{100 * achieved / (res['matmul_gflops'] * 1e9):.1f}%"])
    lines += ["## Model FLOPs (forward + backward, torch FlopCounterMode, batch "
              f"{fb}) and share of the machine's matmul FLOP/s", "",
              P.table(["model", "MFLOP/sample", "best B (1 rank)", "achieved GFLOP/s", "% of matmul FLOP/s"], rows), ""]
    sp = res["split"]
    pb = next(iter(sp.values()))["batch_size"] if sp else 0
    head = ["region"] + [f"{mo} ms" for mo in sp] + [f"{mo} %" for mo in sp]
    rows = []
    for r in SPLIT_ORDER:
        rows.append([r] + [f"{sp[mo]['ms'][r]:.1f}" for mo in sp]
                    + [f"{100 * sp[mo]['ms'][r] / max(sum(sp[mo]['ms'].values()), 1e-9):.0f}%" for mo in sp])
    rows.append(["sum of regions"] + [f"{sum(sp[mo]['ms'].values()):.1f}" for mo in sp] + ["" for _ in sp])
    rows.append(["profiled step (wall)"] + [f"{sp[mo]['profiled_step_ms']:.1f}" for mo in sp] + ["" for _ in sp])
    lines += [f"## Time split of one step (torch.profiler, batch {pb}, 1 rank)", "",
              "Regions are record_function ranges around sub-modules (forward hooks) and around "
              "reader / backward / optimizer in the benchmark's own step; backward includes the fused "
              "sparse (row-wise Adagrad) update; 'STAR / bottom' is the STAR trunk + auxiliary net or "
              "the plain MLP bottom.", "", P.table(head, rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=P.MODELS)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=BATCH_SIZES)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)  # 3 + 20 batches of 8192 fit the 200k default rows
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of the grids; each cell keeps its fastest")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--profile-batch", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="B in 1024 4096, 5 timed steps")
    ap.add_argument("--data", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="train_throughput")
    a = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    if a.worker:
        return worker(a)
    if a.quick:
        a.batch_sizes, a.steps = [1024, 4096], 5
    if not a.data and (a.warmup + a.steps) * max(a.batch_sizes) > a.rows:  # one epoch must hold every timed step
        ap.error(f"--rows {a.rows} holds {a.rows // max(a.batch_sizes)} batches of {max(a.batch_sizes)}, "
                 f"fewer than --warmup {a.warmup} + --steps {a.steps}: raise --rows or lower --steps")
    data_path = a.data or P.ensure_data(rows=a.rows)
    ctx = P.init_world()
    mm = P.matmul_flops()
    res = {"machine": P.machine(), "rows": a.rows, "warmup": a.warmup, "steps": a.steps,
           "models": a.models, "batch_sizes": a.batch_sizes, "matmul_gflops": mm / 1e9}
    runs: dict[str, list[dict]] = {"one_rank": [], "two_ranks": []}
    for r in range(a.repeats):
        for side in (["one_rank", "two_ranks"] if r % 2 == 0 else ["two_ranks", "one_rank"]):
            if side == "one_rank":
                grid = throughput_grid(a.models, a.batch_sizes, data_path, a.warmup, a.steps, ctx)
                runs[side].append({mo: {str(b): v for b, v in g.items()} for mo, g in grid.items()})
            elif 2 in a.ranks:
                runs[side].append(two_rank_grid(a.models, a.batch_sizes, data_path, a.warmup, a.steps))
    res["repeats"] = a.repeats
    res["one_rank"] = fastest_cells(runs["one_rank"])
    res["one_rank_runs"] = runs["one_rank"]
    if runs["two_ranks"]:
        res["two_ranks"] = {**runs["two_ranks"][0],
                            "samples_per_s": fastest_cells([r["samples_per_s"] for r in runs["two_ranks"]])}
        res["two_ranks_runs"] = [r["samples_per_s"] for r in runs["two_ranks"]]
    fb = 1024
    res["flops_batch"] = fb
    res["flops_per_sample"] = {}
    for model in a.models:
        cfg, data, _, state = P.make_state(model, data_path, fb)
        res["flops_per_sample"][model] = flops_per_sample(state, P.prebuilt_batches(cfg, data, 1)[0])
    res["split"] = {}
    for model in a.models:
        res["split"][model] = step_split(model, data_path, a.profile_batch)
        print(f"split {model}: " + ", ".join(f"{k} {v:.1f}" for k, v in res["split"][model]["ms"].items()),
              flush=True)
    res["matmul_gflops_end"] = P.matmul_flops() / 1e9
    command = "python -m benchmarks.train_throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    res["command"] = command
    js, md = P.write_results(a.out, res, markdown(res, command))
    print(open(md).read())
    print(f"wrote {js}, {md}")


if __name__ == "__main__":
    main()
