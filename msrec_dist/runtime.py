"""Process-wide CPU runtime settings for the entry points (train.py, the benchmarks), applied once
before torch is imported and before any tensor is allocated. Imports nothing heavy.

    prepare_process(reader_workers)
        OMP_WAIT_POLICY (env, unless already set), read once when libgomp loads, i.e. at
            `import torch`; so train.py loads its config (torch-free) first:
            reader_workers > 0  PASSIVE: OpenMP threads that spin while idle starve the reader's
                DataLoader workers on a small CPU machine (measured: steps 3x slower once the
                prefetch ran dry).
            reader_workers == 0 (the configs' default: in-process reader) ACTIVE: nothing else
                needs the cores, and a sleeping OpenMP thread pays a wake-up at every parallel
                op (measured on the ple step at B=1024, 2 threads: 17.5-18 ms ACTIVE vs 24-27 ms
                PASSIVE, the same CPU seconds).
        glibc malloc thresholds (mallopt, unless MSREC_MALLOC_TUNE=0): PyTorch's CPU allocator is
            plain malloc, and glibc serves large blocks with fresh mmaps and trims freed heap tops
            back to the kernel, so every step page-faults its activations in again (measured on
            the ple step at B=1024: 76-956 minor faults per step, about 190 per gate_combine call;
            about 7 per step with the thresholds raised, and 15% less step time). Raising the mmap
            threshold to its maximum (32 MiB) and the trim threshold keeps freed blocks in the heap
            for the next step; the process's RSS stays at the peak of a step. No library offers
            this (torch has no caching CPU allocator), so it is one ctypes call.
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


def prepare_process(reader_workers: int) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE" if reader_workers > 0 else "ACTIVE")
    if os.environ.get("MSREC_MALLOC_TUNE", "1") != "0":
        tune_malloc()
