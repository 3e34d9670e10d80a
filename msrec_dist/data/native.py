"""Hand-written C++ helpers of the input pipeline, with numpy fallbacks.

`first_bad_id(values, num_embeddings)`: index of the first id outside [0, num_embeddings) in a
1-D integer array, or -1. The Parquet reader checks every sparse column of every row group
with it. Hand-written because no numpy/torch op returns the first out-of-range index in one
pass: numpy needs two comparisons, an OR and an argmax, each a full pass with a temporary.
The C++ op `torch.ops.msrec.check_ids` (csrc/check_ids.cpp) stops at the first bad id.

The op is used where the extension `msrec_dist._C` loaded (msrec_dist.kernels.native: HAVE_CSRC,
and CSRC_ERROR for why not), else the numpy fallback. Both paths return the same index
(tests/csrc/test_build.py).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from msrec_dist.kernels.native import HAVE_CSRC  # loads msrec_dist._C: torch.ops.msrec.check_ids

_CPP_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def first_bad_id_numpy(values: np.ndarray, num_embeddings: int) -> int:
    """numpy fallback of `first_bad_id` (any integer dtype)."""
    bad = (values < 0) | (values >= num_embeddings)
    return int(bad.argmax()) if bad.any() else -1


def first_bad_id(values: np.ndarray, num_embeddings: int) -> int:
    """Index of the first id in 1-D `values` outside [0, num_embeddings), or -1 if none.

    Uses the C++ op on int32/int64 arrays in native byte order with non-negative strides
    (zero-copy via torch.from_numpy) when the extension is built; the numpy fallback otherwise.
    """
    if (not HAVE_CSRC or values.ndim != 1 or values.dtype not in _CPP_DTYPES or not values.dtype.isnative
            or values.strides[0] < 0 or values.strides[0] % values.itemsize):  # from_numpy can't view these
        return first_bad_id_numpy(values, num_embeddings)
    if values.flags.writeable:
        return torch.ops.msrec.check_ids(torch.from_numpy(values), num_embeddings)
    with warnings.catch_warnings():  # from_numpy warns on read-only arrays; the op only reads
        warnings.simplefilter("ignore", UserWarning)
        return torch.ops.msrec.check_ids(torch.from_numpy(values), num_embeddings)
