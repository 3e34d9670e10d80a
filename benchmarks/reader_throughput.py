"""Throughput of the Parquet → KJT reader alone, and its overhead on the train step.

    python -m benchmarks.reader_throughput [--workers 0 1 2 4] [--batch-size 1024] [--models msrec ple]
                                           [--rounds 3] [--steps 12] [--scan-rounds 5] [--scan-only]

1. rows/s of make_dataloader (the real DataLoader: workers decode row groups, build Batches with
   KJTs, the main process receives them) over one epoch of the synthetic train split, for each
   worker count (0 = in the main process).
2. Per model: trainer samples/s with pre-built in-memory batches vs with the real reader (the
   config's default workers) in both in-process read modes (read-ahead thread, inline), in
   interleaved rounds (fresh loader each round, warm-up steps excluded); overhead = step time
   with reader / step time in memory - 1 (median over rounds).
   Target: reader rows/s at the default workers >= 10x the trainer's samples/s; overhead <= 5%
   in the mode the default (`reader.prefetch_thread: auto`) picks on the machine.
3. The value scan before the first step (msrec_dist/data/scan.py, `reader.scan`) over the train
   split beside one epoch's read of it (workers 0, inline), in interleaved rounds: rows/s of
   each and scan time / read time (median over rounds).
4. With --shuffle-only: one epoch's read in file order vs shuffled (`reader.shuffle`, epoch 0:
   row groups only, and windows of the default shuffle_buffer), workers 0 inline, interleaved
   rounds, against the trainer samples/s of reader_throughput.json, or with --shuffle-trainers
   the models' in-memory train steps timed in the same rounds (one machine, one run).
Writes benchmarks/results/reader_throughput.json and .md; with --scan-only, part 3 alone into
benchmarks/results/reader_scan.json and .md; with --shuffle-only, part 4 into reader_shuffle.json and .md.
"""
from __future__ import annotations

import os

from msrec_dist.runtime import prepare_process

if __name__ == "__main__":  # run as a program: the process settings, before torch loads (below)
    # The OpenMP wait policy is left as train.py leaves it for the configs' default in-process
    # reader (reader.num_workers 0: libgomp's default, msrec_dist/runtime.py), so the step-time
    # overhead is measured the way training runs. (It used to be PASSIVE, train.py's choice for
    # DataLoader workers, for the whole benchmark; the worker rows of part 1 run no torch compute
    # in the main process, so the policy does not touch them.)
    prepare_process(reader_workers=0)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from benchmarks import perf_common as P  # noqa: E402
from msrec_dist.data.schema import ReaderConfig  # noqa: E402


def reader_rows_per_s(data, reader_cfg, max_batches: int | None = None, epoch: int | None = None) -> tuple[float, int]:
    """`epoch`: read that training epoch's order (reader_cfg.shuffle); None: file order."""
    from msrec_dist.data.reader import make_dataloader

    loader = make_dataloader(data, data.train, reader_cfg, epoch=epoch)
    rows, start = 0, time.perf_counter()
    for i, b in enumerate(loader):
        rows += b.size
        if max_batches and i + 1 >= max_batches:
            break
    return rows / (time.perf_counter() - start), rows


def scan_vs_read(data, batch_size: int, rounds: int) -> dict:
    """The value scan of the train split vs one epoch's read of it (make_dataloader, workers 0,
    decoding inline: both on one core), interleaved rounds, the order alternating."""
    from msrec_dist.data.scan import scan_files

    reader_cfg = dataclasses.replace(ReaderConfig(), batch_size=batch_size, num_workers=0, prefetch_thread=False)
    times: dict[str, list[float]] = {"scan": [], "read": []}
    rows = 0
    for r in range(rounds):
        for what in (("scan", "read") if r % 2 == 0 else ("read", "scan")):
            t = time.perf_counter()
            if what == "scan":
                rows = scan_files(data, data.train)
            else:
                reader_rows_per_s(data, reader_cfg)
            times[what].append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(times["scan"], times["read"])]
    return {"rows": rows, "rounds": rounds, "scan_s": times["scan"], "read_s": times["read"],
            "scan_rows_per_s": rows / P.median(times["scan"]), "read_rows_per_s": rows / P.median(times["read"]),
            "scan_s_per_million_rows": P.median(times["scan"]) * 1e6 / rows,
            "scan_over_read": P.median(ratios), "ratios": ratios}


def scan_markdown(sc: dict) -> list[str]:
    return ["## Value scan before the first step vs one epoch's read (`reader.scan`)", "",
            "msrec_dist/data/scan.py scan_files over the train split (every row group read and checked with the "
            "reader's own checks, no batches built) beside make_dataloader over the same split (workers 0, decoding "
            f"inline), {sc['rounds']} interleaved rounds; medians, scan / read = median of the rounds' ratios "
            f"({', '.join(f'{x:.2f}' for x in sc['ratios'])}).", "",
            P.table(["rows", "scan rows/s", "read rows/s (1 epoch)", "scan s per million rows", "scan time / read time"],
                    [[f"{sc['rows']:,}", f"{sc['scan_rows_per_s']:,.0f}", f"{sc['read_rows_per_s']:,.0f}",
                      f"{sc['scan_s_per_million_rows']:.2f}", f"{sc['scan_over_read']:.2f}"]]), ""]


def trainer_rate(model: str, data_path: str, batch_size: int, steps: int, warmup: int = 3):
    """A function timing `steps` train steps on pre-built in-memory batches: samples/s."""
    cfg, data, _, state = P.make_state(model, data_path, batch_size)
    step = P.step_fn(state, cfg)
    mem = P.prebuilt_batches(cfg, data, steps + warmup)

    def timed() -> float:
        it = iter(mem)
        for _ in range(warmup):
            step(next(it))
        t = time.perf_counter()
        for _ in range(steps):
            step(next(it))
        return batch_size * steps / (time.perf_counter() - t)
    return timed


def shuffle_vs_plain(data, batch_size: int, rounds: int, trainers: dict | None = None) -> dict:
    """One epoch's read in file order vs shuffled (epoch 0, seed 0), workers 0, inline; interleaved
    rounds, the order rotating; with `trainers` ({model: trainer_rate(...)}), each round times them
    too (the reader / trainer ratio from one machine and one run)."""
    base = dataclasses.replace(ReaderConfig(), batch_size=batch_size, num_workers=0, prefetch_thread=False)
    variants = {"file order (eval, val; shuffle false)": (base, None),
                "shuffled, row groups only (shuffle_buffer 0)": (dataclasses.replace(base, shuffle_buffer=0), 0),
                f"shuffled (shuffle_buffer {base.shuffle_buffer}, the default)": (base, 0)}
    names = list(variants)
    rps: dict[str, list[float]] = {v: [] for v in names}
    trainers = trainers or {}
    sps: dict[str, list[float]] = {m: [] for m in trainers}
    for r in range(rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            rps[v].append(reader_rows_per_s(data, variants[v][0], epoch=variants[v][1])[0])
        for m, timed in trainers.items():
            sps[m].append(timed())
    return {"rounds": rounds, "rows_per_s": {v: P.median(x) for v, x in rps.items()}, "all": rps,
            "train_samples_per_s": {m: P.median(x) for m, x in sps.items()}, "train_all": sps}


def shuffle_markdown(res: dict, command: str) -> str:
    sh = res["shuffle"]
    same_run = bool(sh.get("train_samples_per_s"))
    train = sh["train_samples_per_s"] if same_run else res.get("train_samples_per_s", {})
    plain = next(iter(sh["rows_per_s"].values()))
    # without same-run trainer timings: this run's ratio to file order times the file-order rows/s
    # measured beside those trainer figures (reader_throughput.json), one machine's rates
    scale = 1.0 if same_run else res.get("json_file_order_rows_per_s", plain) / plain
    rows = [[v, f"{x:,.0f}", f"{x / plain:.2f}", *[f"{x * scale / t:.1f}x" for t in train.values()]]
            for v, x in sh["rows_per_s"].items()]
    return "\n".join([
        "# Reader throughput: file order vs shuffled (`reader.shuffle`)", "",
        f"Machine: {P.machine_line(res['machine'])}", "", *([res["note"], ""] if res.get("note") else []),
        f"Command: `{command}`", "",
        f"Data: synthetic, {res['rows']} train rows in 4 files, row groups of 16384; batch {res['batch_size']}; "
        f"make_dataloader over one epoch, workers 0, decoding inline (one core); {sh['rounds']} interleaved "
        "rounds, medians. Reader / trainer: rows/s over the trainer's samples/s with in-memory batches "
        + ("(1 rank, timed in the same rounds: " + ", ".join(f"{m} {v:,.0f} samples/s" for m, v in train.items()) + ")"
           if same_run else "(1 rank, from reader_throughput.json: " + ", ".join(f"{m} {v:,.0f} samples/s" for m, v in
                                train.items()) + f"; taken as this run's ratio to file order x that run's file-order "
                                f"{res.get('json_file_order_rows_per_s', plain):,.0f} rows/s, so that both rates come "
                                "from one machine)") + "; target >= 10x.", "",
        P.table(["read", "rows/s", "vs file order", *[f"reader / trainer ({m})" for m in train]], rows), ""])


READ_MODES = {"thread": True, "inline": False}  # reader.prefetch_thread of each measured read mode


def step_overhead(model: str, data_path: str, batch_size: int, rounds: int, steps: int, warmup: int = 3) -> dict:
    """Step time with the real reader, in each read mode (read-ahead thread, inline), vs pre-built
    in-memory batches: interleaved rounds, the order rotating each round."""
    from msrec_dist.data.reader import make_dataloader, read_ahead_in_thread
    from msrec_dist.runtime import allowed_cores

    cfg, data, _, state = P.make_state(model, data_path, batch_size)
    step = P.step_fn(state, cfg)
    mem = P.prebuilt_batches(cfg, data, steps + warmup)

    def timed(batches) -> float:
        for _ in range(warmup):
            step(next(batches))
        t = time.perf_counter()
        for _ in range(steps):
            step(next(batches))
        return (time.perf_counter() - t) / steps

    def loader(mode: str):  # fresh loader each round (its read-ahead thread starts), warm-up excluded
        return iter(make_dataloader(data, data.train, dataclasses.replace(cfg.reader, prefetch_thread=READ_MODES[mode])))

    variants = ["memory", *READ_MODES]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            times[v].append(timed(iter(mem) if v == "memory" else loader(v)))
    default = "thread" if read_ahead_in_thread(cfg.reader.prefetch_thread, "cpu", len(allowed_cores()),
                                               torch.get_num_threads()) else "inline"
    out = {"batch_size": batch_size, "workers": cfg.reader.num_workers, "default_mode": default,
           "step_ms_memory": [x * 1e3 for x in times["memory"]],
           "samples_per_s_memory": batch_size / P.median(times["memory"]), "modes": {}}
    for mode in READ_MODES:
        overheads = [a / b - 1 for a, b in zip(times[mode], times["memory"])]
        out["modes"][mode] = {"step_ms_reader": [x * 1e3 for x in times[mode]], "overhead": P.median(overheads),
                              "overheads": overheads, "samples_per_s_reader": batch_size / P.median(times[mode])}
    # the default mode's figures, as before the modes were split
    out.update({k: out["modes"][default][k] for k in ("overhead", "overheads", "samples_per_s_reader")})
    return out


def markdown(res: dict, command: str) -> str:
    lines = ["# Reader throughput (Parquet → KJT) and its step-time overhead", "",
             f"Machine: {P.machine_line(res['machine'])}", "", f"Command: `{command}`", "",
             f"Data: synthetic, {res['rows']} train rows in 4 files, row groups of 16384; batch {res['batch_size']}.", "",
             f"OpenMP wait policy: {res.get('omp_wait_policy', '?')} (train.py's for the configs' in-process reader).", "",
             "## Reader alone (make_dataloader over one epoch)", "",
             P.table(["workers", "rows/s"], [[w, f"{v:,.0f}"] for w, v in res["reader_rows_per_s"].items()]), ""]
    rows = []
    for model, o in res["overhead"].items():
        rd = res["reader_rows_per_s"][str(o["workers"])]
        for mode, m in o["modes"].items():
            rows.append([model, mode + (" (default here)" if mode == o["default_mode"] else ""),
                         f"{o['samples_per_s_memory']:,.0f}", f"{m['samples_per_s_reader']:,.0f}",
                         f"{rd:,.0f}", f"{rd / o['samples_per_s_memory']:.1f}x",
                         f"{100 * m['overhead']:+.1f}% ({', '.join(f'{100 * x:+.1f}' for x in m['overheads'])})"])
    lines += ["## Trainer with the real reader vs pre-built in-memory batches (1 rank)", "",
              "Reader rows/s (default workers) over trainer samples/s (in memory): target >= 10x. "
              "Overhead = median over interleaved rounds of step time with reader / in memory - 1 (each round's "
              "value in brackets): target <= 5%. Read modes (`reader.prefetch_thread`, workers 0): decoding in the "
              "read-ahead thread, or inline in the train loop; 'default here' is the one `auto` picks on this "
              "machine (msrec_dist.data.reader.read_ahead_in_thread).", "",
              P.table(["model", "read mode", "train samples/s (memory)", "train samples/s (reader)",
                       "reader rows/s", "reader / trainer", "step-time overhead"], rows), ""]
    if "scan" in res:
        lines += scan_markdown(res["scan"])
    return "\n".join(lines)


def scan_only_markdown(res: dict, command: str) -> str:
    lines = ["# Value scan before the first step: cost against the reader", "",
             f"Machine: {P.machine_line(res['machine'])}", "", *([res["note"], ""] if res.get("note") else []),
             f"Command: `{command}`", "",
             f"Data: synthetic, {res['rows']} train rows in 4 files, row groups of 16384; batch "
             f"{res['batch_size']}.", "", *scan_markdown(res["scan"])]
    if res.get("train_samples_per_s"):  # from reader_throughput.json, another run of this benchmark
        lines += ["Against training (trainer samples/s with in-memory batches, 1 rank, from "
                  "reader_throughput.json): scan time / one training epoch's time = trainer samples/s / scan rows/s:", "",
                  P.table(["model", "train samples/s", "scan / training epoch"],
                          [[m, f"{v:,.0f}", f"{100 * v / res['scan']['scan_rows_per_s']:.1f}%"]
                           for m, v in res["train_samples_per_s"].items()]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2, 4])
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--models", nargs="+", default=["msrec", "ple"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--scan-rounds", type=int, default=5)
    ap.add_argument("--scan-only", action="store_true", help="part 3 alone (into reader_scan.json/.md)")
    ap.add_argument("--shuffle-only", action="store_true", help="part 4 alone (into reader_shuffle.json/.md)")
    ap.add_argument("--shuffle-trainers", action="store_true", help="with --shuffle-only: time --models' train steps "
                    "(in memory, --steps) in the same rounds")
    ap.add_argument("--note", default="", help="a line for the --scan-only / --shuffle-only results (commit, date, machine)")
    ap.add_argument("--out", default=None, help="results name (default reader_throughput, reader_scan with --scan-only)")
    a = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    from msrec_dist.data.schema import load_data_config

    data_path = P.ensure_data(rows=a.rows)
    data = load_data_config(data_path)
    args = list(argv if argv is not None else sys.argv[1:])
    if "--note" in args:  # the note is printed as its own line
        del args[args.index("--note"):args.index("--note") + 2]
    command = "python -m benchmarks.reader_throughput " + " ".join(args)
    res = {"machine": P.machine(), "rows": a.rows, "batch_size": a.batch_size, "reader_rows_per_s": {}, "overhead": {},
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default")}
    if a.shuffle_only:
        trainers = {}
        if a.shuffle_trainers:
            P.init_world()
            trainers = {m: trainer_rate(m, data_path, a.batch_size, a.steps) for m in a.models}
        res = {"machine": res["machine"], "note": a.note, "rows": a.rows, "batch_size": a.batch_size, "command": command,
               "shuffle": shuffle_vs_plain(data, a.batch_size, a.rounds, trainers)}
        prev = os.path.join(P.RESULTS, "reader_throughput.json")
        if os.path.exists(prev):
            prev = json.load(open(prev))
            res["train_samples_per_s"] = {m: o["samples_per_s_memory"] for m, o in prev["overhead"].items()}
            res["json_file_order_rows_per_s"] = prev["reader_rows_per_s"]["0"]
        js, md = P.write_results(a.out or "reader_shuffle", res, shuffle_markdown(res, command))
        print(open(md).read())
        return
    if a.scan_only:
        res = {"machine": res["machine"], "note": a.note, "rows": a.rows, "batch_size": a.batch_size, "command": command,
               "scan": scan_vs_read(data, a.batch_size, a.scan_rounds)}
        prev = os.path.join(P.RESULTS, "reader_throughput.json")
        if os.path.exists(prev):
            res["train_samples_per_s"] = {m: o["samples_per_s_memory"] for m, o in json.load(open(prev))["overhead"].items()}
        js, md = P.write_results(a.out or "reader_scan", res, scan_only_markdown(res, command))
        print(open(md).read())
        return
    P.init_world()
    for w in a.workers:
        rps, n = reader_rows_per_s(data, dataclasses.replace(ReaderConfig(), batch_size=a.batch_size, num_workers=w))
        res["reader_rows_per_s"][str(w)] = rps
        print(f"reader, {w} workers: {rps:,.0f} rows/s ({n} rows)", flush=True)
    for model in a.models:
        o = step_overhead(model, data_path, a.batch_size, a.rounds, a.steps)
        if str(o["workers"]) not in res["reader_rows_per_s"]:
            res["reader_rows_per_s"][str(o["workers"])] = reader_rows_per_s(
                data, dataclasses.replace(ReaderConfig(), batch_size=a.batch_size, num_workers=o["workers"]))[0]
        res["overhead"][model] = o
        print(f"{model}: memory {o['samples_per_s_memory']:,.0f} samples/s; " + "; ".join(
            f"{mode} {m['samples_per_s_reader']:,.0f}, overhead {100 * m['overhead']:+.1f}%" for mode, m in o["modes"].items()),
            flush=True)
    res["scan"] = sc = scan_vs_read(data, a.batch_size, a.scan_rounds)
    print(f"value scan: {sc['scan_rows_per_s']:,.0f} rows/s vs one epoch's read {sc['read_rows_per_s']:,.0f} rows/s: "
          f"scan / read {sc['scan_over_read']:.2f}", flush=True)
    res["command"] = command
    res["torch_threads"] = torch.get_num_threads()
    js, md = P.write_results(a.out or "reader_throughput", res, markdown(res, command))
    print(open(md).read())


if __name__ == "__main__":
    main()
