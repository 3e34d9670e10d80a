"""Hand-written C++ helpers of the input pipeline, with numpy fallbacks.

`first_bad_id(values, num_embeddings)`: index of the first id outside [0, num_embeddings) in a
1-D integer array, or -1. The Parquet reader checks every sparse column of every row group
with it. Hand-written because no numpy/torch op returns the first out-of-range index in one
pass: numpy needs two comparisons, an OR and an argmax, each a full pass with a temporary.
The C++ op `torch.ops.msrec.check_ids` (csrc/check_ids.cpp) stops at the first bad id.

`gather_jagged_rows(values, offsets, idx)`: rows `idx` of jagged int64 columns laid end to end
(a shuffle window's row groups; a list feature's gather). Hand-written because numpy must
concatenate the parts and then take four full passes with temporaries (repeat, arange, add,
take), and neither torch nor fbgemm has an int64 jagged gather on CPU;
`torch.ops.msrec.gather_jagged_rows` (csrc/gather_jagged_rows.cpp) copies each selected row once.

The ops are used where the extension `msrec_dist._C` loaded (msrec_dist.kernels.native: HAVE_CSRC,
and CSRC_ERROR for why not), else the numpy fallback. Both paths return the same results
(tests/csrc/test_build.py).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from msrec_dist.kernels.native import HAVE_CSRC  # loads msrec_dist._C: torch.ops.msrec.*

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



def _tensors(arrays):
    with warnings.catch_warnings():  # from_numpy warns on read-only arrays; the ops only read them
        warnings.simplefilter("ignore", UserWarning)
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def gather_jagged_rows_numpy(values: list[np.ndarray], offsets: list[np.ndarray],
                             idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy fallback of `gather_jagged_rows`: the parts concatenated, then four passes."""
    vals = np.concatenate([v[o[0]:o[-1]] for v, o in zip(values, offsets)])
    lengths = np.concatenate([np.diff(o) for o in offsets])
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    lengths = np.take(lengths, idx)
    new = np.zeros(len(idx) + 1, np.int64)
    np.cumsum(lengths, out=new[1:])
    at = np.repeat(np.take(off, idx) - new[:-1], lengths)  # each output id's source
    at += np.arange(new[-1])
    return np.take(vals, at), new


def gather_jagged_rows(values: list[np.ndarray], offsets: list[np.ndarray],
                       idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows `idx` of jagged int64 columns laid end to end, part p's row r being
    values[p][offsets[p][r]:offsets[p][r + 1]]: (the rows' ids in idx's order, their offsets
    [len(idx) + 1] from 0)."""
    if not HAVE_CSRC or not all(a.dtype == np.int64 and a.dtype.isnative for a in [*values, *offsets, idx]):
        return gather_jagged_rows_numpy(values, offsets, idx)
    v, o = torch.ops.msrec.gather_jagged_rows(_tensors(values), _tensors(offsets), *_tensors([idx]))
    return v.numpy(), o.numpy()
