"""gloo's all_reduce vs msrec_dist's sums (msrec_dist/distributed/collectives.py: the pairwise exchange
over gloo and the shared-memory all-reduce), side by side.

    python -m benchmarks.collectives [--sizes 3 1000 ...] [--calls 300]

Starts 2 ranks with torchrun (bound to disjoint cores as train.py's ranks are,
msrec_dist/runtime.py). For each tensor size, rounds alternate the implementations (in a rotating order)
(`--rounds` of `--calls` back-to-back calls each) and every call's wall time is kept: the table
shows p10 / median / p90 over all calls of each, and the share of calls over 2 ms.
The sizes default to the train loop's: the has-data agreement (3 ints), a STAR partitioned-norm
statistic, the ple model's gradients (65k dense values; 306k with the demo tables replicated).
Writes benchmarks/results/collectives.json and .md.
"""
from __future__ import annotations

from msrec_dist.runtime import prepare_process

if __name__ == "__main__":  # run as a program: the process settings, before torch loads (below)
    prepare_process(reader_workers=0)  # as train.py does for the configs' in-process reader

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import perf_common as P  # noqa: E402

SIZES = [3, 1000, 30_000, 65_000, 306_000, 1_000_000]
SLOW_MS = 2.0


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def worker(a) -> None:
    from msrec_dist.distributed import collectives
    from msrec_dist.distributed.context import init_distributed

    ctx = init_distributed()
    shm = collectives.SharedMemoryAllReduce(dist.group.WORLD, timeout_s=60.0)
    impls = {"gloo all_reduce": lambda t: dist.all_reduce(t), "exchange (msrec_dist)": collectives.all_reduce_sum_,
             "shared memory (msrec_dist)": shm}
    for name, fn in impls.items():  # each gives the sum: rank-dependent values, every rank checks
        x = torch.arange(1000, dtype=torch.float32) * (ctx.rank + 1)
        fn(x)
        expect = torch.arange(1000, dtype=torch.float32) * sum(r + 1 for r in range(ctx.world_size))
        if not torch.equal(x, expect):
            raise AssertionError(f"{name}: wrong sum on rank {ctx.rank}")
    out: dict = {}
    for n in a.sizes:
        t = torch.ones(n) if n > 3 else torch.ones(n, dtype=torch.long)
        times: dict[str, list[float]] = {k: [] for k in impls}
        for r in range(a.rounds):
            names = list(impls)
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn = impls[name]
                for _ in range(5):
                    fn(t)
                for _ in range(a.calls):
                    t0 = time.perf_counter()
                    fn(t)
                    times[name].append((time.perf_counter() - t0) * 1e3)
        out[str(n)] = {k: {"p10_ms": quantile(v, 0.1), "median_ms": quantile(v, 0.5), "p90_ms": quantile(v, 0.9),
                           "share_over_2ms": sum(x > SLOW_MS for x in v) / len(v), "calls": len(v)}
                       for k, v in times.items()}
    if ctx.rank == 0:
        with open(a.worker, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def markdown(res: dict, command: str) -> str:
    rows = []
    for n, impls in res["sizes"].items():
        for name, s in impls.items():
            rows.append([f"{int(n):,}", f"{int(n) * (8 if int(n) == 3 else 4) / 1024:,.1f}", name,
                         f"{s['p10_ms']:.3f}", f"{s['median_ms']:.3f}", f"{s['p90_ms']:.3f}",
                         f"{s['share_over_2ms']:.0%}"])
    return "\n".join([
        "# gloo all_reduce vs pairwise exchange vs shared memory (2 ranks)", "",
        f"Machine: {P.machine_line(res['machine'])}", "", f"Command: `{command}`", "",
        f"Ranks bound to one core each (msrec_dist/runtime.py): {res.get('bound', 'yes')}. "
        f"{res['rounds']} alternating rounds of {res['calls']} back-to-back calls per implementation and size; "
        "times are per call over all rounds (rank 0's clock).", "",
        P.table(["values", "KiB", "implementation", "p10 ms", "median ms", "p90 ms", "calls > 2 ms"], rows),
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=SIZES)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="collectives")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collectives.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "benchmarks.collectives", "--worker", out, "--calls", str(a.calls), "--rounds", str(a.rounds),
               "--sizes", *map(str, a.sizes)]
        proc = subprocess.run(cmd, cwd=P.REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"2-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(out) as f:
            sizes = json.load(f)
    res = {"machine": P.machine(), "bound": "no" if os.environ.get("MSREC_BIND_CORES") == "0" else "yes",
           "calls": a.calls, "rounds": a.rounds, "sizes": sizes}
    command = "python -m benchmarks.collectives" + (" " + " ".join(argv) if argv else "")
    js, md = P.write_results(a.out, res, markdown(res, command))
    print(open(md).read())
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main(sys.argv[1:])
