"""How the Triton kernels are autotuned: one decorator both kernel modules use.

Autotuning compiles every config once per key (E, T, D for gating; F, dh for attention) and
times them. Two cases take the first config only:
  - the CPU interpreter (TRITON_INTERPRET=1), which has no driver to time configs on;
  - MSREC_TRITON_AUTOTUNE=0, for parity sweeps over many small shapes on a GPU, where
    compiling all configs for each of dozens of keys would take minutes
    (tests/kernels/test_cuda.py; the benchmark keeps autotuning and checks its own outputs).
"""
import os
from typing import Callable, Optional, Sequence

import triton


def single_config() -> bool:
    """True where only the first config is used (interpreter, or MSREC_TRITON_AUTOTUNE=0)."""
    return bool(triton.knobs.runtime.interpret) or os.environ.get("MSREC_TRITON_AUTOTUNE", "1") == "0"


def tuned(configs: Sequence["triton.Config"], key: Sequence[str], prune: Optional[Callable] = None):
    """triton.autotune over `configs` keyed on `key` (never on B), or the first config alone."""
    if single_config():
        return triton.autotune(configs=list(configs[:1]), key=list(key))
    pruning = {"early_config_prune": prune} if prune is not None else None
    return triton.autotune(configs=list(configs), key=list(key), prune_configs_by=pruning)
