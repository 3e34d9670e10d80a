"""Process-wide CPU runtime settings for the entry points (train.py, the benchmarks), applied once
before torch is imported and before any tensor is allocated. Imports nothing heavy.

    prepare_process(reader_workers)
        OMP_WAIT_POLICY (env, never overriding a user's value; libgomp reads it once when it loads,
        i.e. at `import torch`, so train.py loads its config, which is torch-free, first):
          reader_workers > 0: PASSIVE. Between ops, OpenMP threads spin for a while before they
            sleep (libgomp's default), and ops follow each other within microseconds, so during
            a step the helper thread never sleeps and starves the DataLoader workers on a small
            machine (steps 3x slower once the prefetch ran dry).
          reader_workers == 0 (the configs' default, in-process reader): libgomp's default. A
            sleeping thread pays a wake-up at every parallel op (msrec step 51 ms vs 70-81 ms with
            PASSIVE); ACTIVE (spin forever) was no faster and starves other processes while this
            one waits.
        glibc malloc thresholds (mallopt, unless MSREC_MALLOC_TUNE=0): PyTorch's CPU allocator is
            plain malloc, and glibc serves large blocks with fresh mmaps and trims freed heap tops
            back to the kernel, so every step page-faults its activations in again (hundreds of
            minor faults per ple step; about 7 with the thresholds raised, and 15% less step time).
            Raising the mmap
            threshold to its maximum (32 MiB) and the trim threshold keeps freed blocks in the heap
            for the next step; the process's RSS stays at the peak of a step. No library offers
            this (torch has no caching CPU allocator), so it is one ctypes call.
        CPU cores per local rank (unless MSREC_BIND_CORES=0): with LOCAL_WORLD_SIZE > 1 ranks on
            one machine (torchrun / torchx dist.ddp set it) and nobody having bound the process
            already (its allowed CPUs are all the online ones), local rank r keeps cores
            [r*k, (r+1)*k), k = cores // local ranks, for itself and the threads it starts (the
            read-ahead and gloo threads). Unbound, the scheduler moved the ranks' threads over
            both cores and a rank waited in its collectives for the other to be scheduled (2-rank
            ple step 26 ms unbound vs 24 ms bound). The same binding that torch's
            CPU launcher (torch.backends.xeon.run_cpu) or `taskset` per rank would do; done here
            so that `torchx run dist.ddp` gets it with no wrapper.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's cap on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds; False where libc is not glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def rank_cores(allowed: list[int], online: int, local_rank: int, local_world_size: int) -> list[int] | None:
    """The cores local rank `local_rank` binds to, or None: one rank, an affinity someone else
    set (fewer allowed cores than online ones), or fewer cores than local ranks."""
    if local_world_size <= 1 or len(allowed) != online or len(allowed) < local_world_size:
        return None
    per_rank = len(allowed) // local_world_size
    cores = sorted(allowed)
    return cores[local_rank * per_rank: (local_rank + 1) * per_rank]


def allowed_cores() -> list[int]:
    """The cores this process may run on (its affinity; all online cores where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def bind_rank_cores(env=os.environ) -> list[int] | None:
    """Restrict this process to its local rank's cores (see the module docstring); the cores, or None."""
    if env.get("MSREC_BIND_CORES", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    cores = rank_cores(allowed_cores(), os.cpu_count() or 1,
                       int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)))
    if cores is not None:
        os.sched_setaffinity(0, cores)
    return cores


def prepare_process(reader_workers: int) -> None:
    if reader_workers > 0:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get("MSREC_MALLOC_TUNE", "1") != "0":
        tune_malloc()
    bind_rank_cores()
