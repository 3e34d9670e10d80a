"""Shared helpers for the kernel tests: one per-dtype tolerance, seeded inputs, the C++ kernels' skip."""
import os

import pytest
import torch


def tol(dtype: torch.dtype) -> dict:
    """assert_close tolerances per dtype. fp32 leaves room for tf32x3 dots on a GPU; the
    interpreter itself agrees with the reference to ~1e-6."""
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-9),
        torch.float32: dict(atol=1e-4, rtol=1e-4),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    }[dtype]


def randn(*shape, dtype=torch.float32, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)


def key_mask(B: int, F: int, seed: int = 0) -> torch.Tensor:
    """[B, F] bool, True = padded; row 0 fully padded, row 1 (if any) with no padding."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, F, generator=gen) < 0.4
    mask[0] = True
    if B > 1:
        mask[1] = False
    return mask


def run_with_grads(fn, inputs, grad_out_seed=1):
    """fn(*inputs) and the grads of every input for one seeded upstream gradient."""
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    out.backward(randn(*out.shape, dtype=out.dtype, seed=grad_out_seed, requires_grad=False))
    return out.detach(), [x.grad.clone() for x in inputs]


def csrc_mark(missing: str | None):
    """pytestmark for tests of a C++ op: skipped with `missing` as the reason where it is not None,
    unless MSREC_REQUIRE_CSRC=1 (as `make test` sets), which turns the skip into a failure."""
    if missing and os.environ.get("MSREC_REQUIRE_CSRC") == "1":
        raise RuntimeError(f"MSREC_REQUIRE_CSRC=1 but {missing} "
                           "(MSREC_BUILD_CSRC=1 pip install --no-build-isolation -e .)")
    return pytest.mark.skipif(missing is not None, reason=missing or "")


def cpp_kernel_mark(op: str):
    """csrc_mark for the tests of op's C++ CPU kernel."""
    from msrec_dist.kernels import ops

    return csrc_mark(None if op in ops.cpp_kernels() else
                     f"the C++ {op} kernel is not built (C++ extension msrec_dist._C not built)")
