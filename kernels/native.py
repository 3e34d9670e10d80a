"""The one place that loads the C++ extension msrec_dist._C (csrc/*.cpp; built by
`MSREC_BUILD_CSRC=1 pip install --no-build-isolation -e .`, see csrc/README.md).

Loading the .so registers its ops under torch.ops.msrec: check_ids (msrec_dist/data/native.py),
gate_combine_cpp and field_attention_cpp with their backward ops (kernels/ops.py),
rowwise_adagrad_dense_ (msrec_dist/distributed/replicated.py) and shm_all_reduce_sum_
(msrec_dist/distributed/collectives.py). Their users import this module, never the extension.

    HAVE_CSRC   whether the extension loaded
    CSRC_ERROR  why not (None where it loaded): not built, or built against another torch
    has_op      whether an op of it is registered (an older build lacks the newer ops)
    extension_path  the loaded .so (an exported program that calls the ops ships a copy of it)

The extension is loaded by name (importlib), not by a Python import of msrec_dist: kernels/
imports nothing else of msrec_dist (the import-linter contract in pyproject.toml).
"""
from __future__ import annotations

import importlib

import torch  # first: the .so links against libtorch (and the libgomp torch has loaded)


def _load() -> str | None:
    """Loads msrec_dist._C; None, or why it did not load."""
    try:
        importlib.import_module("msrec_dist._C")
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


CSRC_ERROR: str | None = _load()
HAVE_CSRC: bool = CSRC_ERROR is None


def has_op(name: str) -> bool:
    """Whether torch.ops.msrec.<name> was registered by the extension (False where it is not built)."""
    return HAVE_CSRC and hasattr(torch.ops.msrec, name)


def extension_path() -> str:
    """The file of the loaded extension; torch.ops.load_library(path) registers its ops in a
    process that does not import msrec_dist."""
    if not HAVE_CSRC:
        raise RuntimeError(f"the C++ extension msrec_dist._C is not loaded: {CSRC_ERROR}")
    return importlib.import_module("msrec_dist._C").__file__
