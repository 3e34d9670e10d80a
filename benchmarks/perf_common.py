"""Shared helpers of the throughput benchmarks and the perf regression tests (tests/perf).

    machine()            platform, cores, torch version and threads: every result names it
    ensure_data()        synthetic Parquet data (msrec_dist.data.synth), cached under runs/bench_data
    make_state()         config + data + TrainState for a world of one (DMP, like a real run)
    prebuilt_batches()   in-memory Batches from the real reader (no reader in the timed loop)
    matmul_flops()       this machine's fp32 matmul FLOP/s (for the FLOP-share tables)
    *_workload()         fixed calibration workloads of the perf tests
    CASES / measure_case                 the perf-test cases: throughput / calibration ratios
                                         (checked against benchmarks/perf_baselines.py's file)
    write_results()      benchmarks/results/<name>.json + .md

Importing this module loads torch and sets nothing process-wide. The entry points (`python -m benchmarks.X`)
call msrec_dist.runtime.prepare_process(0) themselves, first thing when run as a program, before
this module loads torch: the same settings as msrec_dist/train.py's for the configs' in-process
reader (libgomp's default wait policy, glibc malloc thresholds, a local rank's cores); an entry
point that wants another OpenMP wait policy sets OMP_WAIT_POLICY before that.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.perf_baselines import host_signature

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
RESULTS = os.path.join(REPO, "benchmarks", "results")
MODELS = ["msrec", "ple", "star", "mmoe", "shared_bottom"]
QUIET = ("run.progress=false", "run.tensorboard=false")


def git_commit() -> str:
    """The short commit of this checkout, for the results files ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "host_signature": host_signature(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    return (f"{m['cpu_model']} ({m['processor']}), {m['cores']} cores, {m['platform']}, "
            f"torch {m['torch']}, {m['torch_threads']} torch threads")


def ensure_data(rows: int = 200_000, seed: int = 0, eval_rows: int = 50_000, root: str | None = None) -> str:
    """data.yaml of synthetic data with `rows` train rows (generated once, then reused)."""
    from msrec_dist.data.synth import generate

    root = root or os.path.join(REPO, "runs", "bench_data")
    out = os.path.join(root, f"rows{rows}_eval{eval_rows}_seed{seed}")
    path, done = os.path.join(out, "data.yaml"), os.path.join(out, ".complete")
    if not os.path.exists(done):
        generate(out, rows, shards=4, seed=seed, eval_rows=eval_rows)
        open(done, "w").close()
    return path


def init_world():
    from msrec_dist.distributed.context import init_distributed

    return init_distributed()


def make_state(model: str, data_path: str, batch_size: int, overrides: tuple[str, ...] = (), ctx=None,
               total_steps: int = 10_000):
    """(cfg, data, ctx, TrainState) of configs/<model>.yaml with local batch `batch_size`."""
    from msrec_dist.config import load_experiment
    from msrec_dist.data.schema import load_data_config
    from msrec_dist.distributed.model_parallel import build_train_state

    ctx = ctx or init_world()
    cfg = load_experiment(os.path.join(CONFIGS, f"{model}.yaml"), data_path,
                          QUIET + (f"reader.batch_size={batch_size}",) + tuple(overrides))
    data = load_data_config(cfg.data)
    return cfg, data, ctx, build_train_state(cfg, data, ctx, total_steps)


def prebuilt_batches(cfg, data, n: int, rank: int = 0, world_size: int = 1) -> list:
    """The first n batches of this rank, read once (in-process, no workers) and kept in memory."""
    import dataclasses

    from msrec_dist.data.reader import make_dataloader

    reader = dataclasses.replace(cfg.reader, num_workers=0)
    out = []
    for b in make_dataloader(data, data.train, reader, rank, world_size):
        out.append(b)
        if len(out) == n:
            break
    return out


def step_fn(state, cfg, world_size: int = 1) -> Callable:
    """msrec_dist.training.step.train_step bound to a state, its DenseStep and its LossGuard, as
    Trainer.step runs it (rank 0's view; the guard's sum runs over every rank of the group)."""
    import torch.distributed as dist

    from msrec_dist.training.step import DenseStep, LossGuard, train_step

    dense_step = DenseStep(state, cfg.train.grad_clip)
    rank = dist.get_rank() if world_size > 1 else 0
    guard = LossGuard(cfg.train.nan_policy, rank, world_size, state.scheduler)

    def step(batch, global_rows=None):
        return train_step(state, batch, global_rows or batch.size * world_size, world_size, dense_step, guard)
    return step


def median(xs) -> float:
    return statistics.median(xs)


# ---- calibrations ---------------------------------------------------------------------------

def matmul_flops(n: int = 1024, reps: int = 5, repeats: int = 7) -> float:
    """fp32 FLOP/s of an n×n×n torch.mm at the current thread count (median of repeats)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        times.append((time.perf_counter() - t) / reps)
    return 2 * n ** 3 / median(times)


def mlp_train_workload(batch: int = 1024, dims: tuple[int, ...] = (256, 256, 128, 64, 2),
                       steps: int = 2) -> Callable[[], None]:
    """A fixed plain-PyTorch train loop (MLP forward, BCE, backward, Adam): the same mix of small
    GEMMs, elementwise ops, autograd and Python dispatch as a model train step, so machine noise
    moves it and the step alike (a lone matmul tracked the step less well: measured)."""
    g = torch.Generator().manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(dims[-2], dims[-1]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(batch, dims[0], generator=g)
    y = (torch.rand(batch, dims[-1], generator=g) < 0.3).float()

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
            loss.backward()
            opt.step()
    return run


def arrow_decode_workload(path: str) -> Callable[[], None]:
    """A fixed pyarrow + numpy decode of one Parquet file (row groups → numpy int64/float32
    columns, list offsets → lengths): the reader's own kind of work, without the reader."""
    import numpy as np
    import pyarrow.parquet as pq

    def run():
        f = pq.ParquetFile(path)
        for g in range(f.num_row_groups):
            t = f.read_row_group(g)
            for col in t.columns:
                arr = col.combine_chunks()
                if hasattr(arr, "offsets"):
                    np.diff(arr.offsets.to_numpy()).astype(np.int32)
                    arr = arr.values
                arr.to_numpy(zero_copy_only=False).astype(np.float32 if arr.type == "float" else np.int64)
    return run


def gate_loop(fn: Callable, B: int, E: int, T: int, D: int, reps: int, seed: int) -> Callable[[], None]:
    """`reps` forward+backward calls of fn(expert_out [B, E, D], gate_logits [T, B, E]) → [T, B, D]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, E, D, generator=g, requires_grad=True)
    logits = torch.randn(T, B, E, generator=g, requires_grad=True)
    grad = torch.randn(T, B, D, generator=g)

    def run():
        for _ in range(reps):
            y.grad = logits.grad = None
            fn(y, logits).backward(grad)
    return run


def attention_loop(fn: Callable, B: int, H: int, F: int, dh: int, reps: int, seed: int) -> Callable[[], None]:
    """`reps` forward+backward calls of fn(q, k, v [B, H, F, dh]) → [B, H, F, dh]."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, F, dh, generator=g, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, F, dh, generator=g)

    def run():
        for _ in range(reps):
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(grad)
    return run


def softmax_mix(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A fixed inline copy of gate_combine's math: the calibration of the gate_combine reference
    case, so the ratio isolates the project's own overheads (op dispatch, dtypes, its backward)."""
    return torch.einsum("tbe,bed->tbd", logits.softmax(-1), y)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A fixed inline softmax(q kᵀ/√dh) v: the calibration of field_attention's reference case."""
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v


# ---- perf-test cases ------------------------------------------------------------------------

@dataclass
class Case:
    """One regression case: `setup()` returns (work, calibration, units per work call)."""
    name: str
    unit: str
    calibration: str
    setup: Callable[[], tuple[Callable[[], None], Callable[[], None], float]]


def _train_case(model: str, batch_size: int, steps: int):
    def setup():
        data_path = _test_data()
        cfg, data, _, state = make_state(model, data_path, batch_size, ("train.warmup_steps=1",))
        batches = prebuilt_batches(cfg, data, steps)
        step = step_fn(state, cfg)
        for b in batches[:2]:
            step(b)  # warm-up

        def work():
            for b in batches:
                step(b)
        return work, mlp_train_workload(), float(steps * batch_size)
    return setup


def _reader_case(batch_size: int, batches: int):
    def setup():
        from msrec_dist.data.reader import ParquetBatchDataset, ReaderConfig, validate_files
        from msrec_dist.data.schema import load_data_config

        data = load_data_config(_test_data())
        index = validate_files(data, data.train)
        ds = ParquetBatchDataset(data, index, ReaderConfig(batch_size=batch_size, num_workers=0))

        def work():
            it = iter(ds)
            for _ in range(batches):
                next(it)
        work()
        return work, arrow_decode_workload(index.files[0]), float(batches * batch_size)
    return setup


def _gate_case(B: int = 4096, E: int = 4, T: int = 2, D: int = 64, reps: int = 10):
    def setup():
        import msrec_dist.kernels as K

        work = gate_loop(lambda y, logits: K.gate_combine(y, logits, kernel="reference"), B, E, T, D, reps, seed=0)
        work()
        return work, gate_loop(softmax_mix, B, E, T, D, reps, seed=1), float(reps * B)
    return setup


def _attn_case(B: int = 1024, H: int = 2, F: int = 16, dh: int = 16, reps: int = 10):
    def setup():
        import msrec_dist.kernels as K

        work = attention_loop(lambda q, k, v: K.field_attention(q, k, v, None, kernel="reference"),
                              B, H, F, dh, reps, seed=0)
        work()
        return work, attention_loop(plain_attention, B, H, F, dh, reps, seed=1), float(reps * B)
    return setup


_DATA_ROOT: list[str] = []


def _test_data() -> str:
    """Small data set for the perf tests (60k rows, generated in about a second)."""
    root = _DATA_ROOT[0] if _DATA_ROOT else None
    return ensure_data(rows=60_000, eval_rows=5_000, root=root)


def set_test_data_root(root: str) -> None:
    _DATA_ROOT[:] = [root]


CASES = {
    # every block on (configs/msrec_full.yaml; the case's baseline was measured on it)
    "train_step_msrec": Case("train_step_msrec", "samples", "mlp_train", _train_case("msrec_full", 1024, 2)),
    "train_step_ple": Case("train_step_ple", "samples", "mlp_train", _train_case("ple", 1024, 5)),
    "reader": Case("reader", "rows", "arrow_decode", _reader_case(1024, 48)),
    "gate_combine_reference": Case("gate_combine_reference", "samples", "inline_softmax_mix", _gate_case()),
    # No case for gate_combine's C++ kernel: against this calibration its ratio moved by 0.54..0.75
    # between fresh processes (measured), more than the 25% a test must catch; the train_step_ple
    # case runs it (kernels: auto picks it on CPU).
    "field_attention_reference": Case("field_attention_reference", "samples", "inline_attention", _attn_case()),
}


def cpu_timed(fn: Callable[[], object]) -> float:
    """CPU seconds of this process (all its threads) spent in fn()."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def measure_case(work: Callable[[], None], calib: Callable[[], None], repeats: int = 21,
                 slowdown: float = 0.0) -> dict:
    """Interleaved repeats of (work, calibration). ratio = work time / time of one calibration
    call (higher = slower); the calibration is repeated to last about as long as the work.

    Times are CPU seconds of this process (time.process_time), not wall time: another process
    on the machine (or the hypervisor) taking the core away shows up in wall time only, so the
    CPU clock removes the largest noise source of a shared 2-core VM; what remains (caches and
    memory bandwidth shared with neighbours) is cut by the estimator, min(work) / min(calibration)
    over the repeats: interference only ever slows a repeat down. The median of the per-pair
    ratios is reported too.
    `slowdown` > 0 injects that fraction of extra work CPU time after each work call
    (a busy wait), which is what a real regression of that size looks like to the test."""
    tw0, tc0 = cpu_timed(work), cpu_timed(calib)
    reps = max(1, round(tw0 / max(tc0, 1e-6)))
    works, cals = [], []
    for _ in range(repeats):
        tw = cpu_timed(work)
        if slowdown:  # spin, not sleep: a sleep costs no CPU time
            end = time.process_time() + tw * slowdown
            while time.process_time() < end:
                pass
            tw *= 1.0 + slowdown
        t = time.process_time()
        for _ in range(reps):
            calib()
        tc = (time.process_time() - t) / reps
        works.append(tw)
        cals.append(tc)
    pair = [w / c for w, c in zip(works, cals)]
    return {"ratio": min(works) / min(cals), "median_pair_ratio": median(pair), "work_s": min(works),
            "calib_s": min(cals), "calib_reps": reps, "repeats": repeats}


# ---- results --------------------------------------------------------------------------------

def write_results(name: str, payload: dict, markdown: str) -> tuple[str, str]:
    os.makedirs(RESULTS, exist_ok=True)
    js, md = os.path.join(RESULTS, f"{name}.json"), os.path.join(RESULTS, f"{name}.md")
    with open(js, "w") as f:
        json.dump(payload, f, indent=2)
    with open(md, "w") as f:
        f.write(markdown.rstrip() + "\n")
    return js, md


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
