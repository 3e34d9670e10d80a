"""field_attention's C++ CPU kernel (csrc/field_attention.cpp, impl "cpp") against the PyTorch
reference: forward, backward and the saved log-sum-exp over odd shapes with and without padded
keys (a fully padded sample included), head sizes 5 to 32, B*H not a multiple of the kernel's
8 lanes, threads, fp64 gradcheck, opcheck, the wrapper's C++ autograd path, routing and errors.

Needs the extension built into the venv (`make setup` builds it). Skipped when it is not, unless
MSREC_REQUIRE_CSRC=1 (as `make test` sets), which turns the skip into a failure.
"""
import pytest
import torch

import msrec_dist.kernels as K
from msrec_dist.kernels import ops
from msrec_dist.kernels.ref_field_attention import field_attention_forward_ref, field_attention_ref

from .test_ops import ATTN_SHAPES, attn_inputs
from .utils import cpp_kernel_mark, key_mask, randn, run_with_grads, tol

pytestmark = cpp_kernel_mark("field_attention")

# ATTN_SHAPES (odd F, dh 8 and 24) plus dh 16, 32 and 5, B*H not a multiple of the 8 lanes, and the model's dh
SHAPES = ATTN_SHAPES + [(5, 2, 8, 16), (3, 1, 6, 32), (4, 2, 8, 8), (2, 3, 17, 5)]


def assert_matches_reference(inputs, mask, dtype=torch.float32):
    out, grads = run_with_grads(lambda q, k, v: K.field_attention(q, k, v, mask, kernel="cpp"), inputs)
    ref, ref_grads = run_with_grads(lambda q, k, v: field_attention_ref(q, k, v, mask), inputs)
    torch.testing.assert_close(out, ref, **tol(dtype))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol(dtype))
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("B,H,F,dh", SHAPES)
def test_parity(B, H, F, dh, masked, dtype):
    mask = key_mask(B, F) if masked else None
    out, grads = assert_matches_reference(attn_inputs(B, H, F, dh, dtype), mask, dtype)
    if masked:  # sample 0 has every key padded: exact zeros, no NaN
        assert all(t[0].eq(0).all() and not t.isnan().any() for t in (out, *grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lse_matches_reference(dtype):
    q, k, v = attn_inputs(4, 2, 13, 24, dtype)
    mask = key_mask(4, 13)
    _, lse = torch.ops.msrec.field_attention_cpp(q, k, v, mask)
    _, ref = field_attention_forward_ref(q, k, v, mask)
    assert lse.dtype == dtype and not lse.requires_grad
    assert lse[0].eq(float("inf")).all()  # fully padded sample
    torch.testing.assert_close(lse, ref.to(dtype), **tol(dtype))


def test_many_threads_agree():
    """Large B splits over at::parallel_for chunks; the result does not depend on the split."""
    inputs, mask = attn_inputs(2051, 2, 8, 8), key_mask(2051, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_grads = run_with_grads(lambda q, k, v: K.field_attention(q, k, v, mask, kernel="cpp"), inputs)
        torch.set_num_threads(max(2, threads))
        many, many_grads = run_with_grads(lambda q, k, v: K.field_attention(q, k, v, mask, kernel="cpp"), inputs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many) and all(torch.equal(a, b) for a, b in zip(one_grads, many_grads))
    assert_matches_reference(inputs, mask)


@pytest.mark.parametrize("dh", [8, 5])
def test_gradcheck_fp64_full_jacobian(dh):
    q, k, v = attn_inputs(3, 2, 5, dh, dtype=torch.float64)
    mask = key_mask(3, 5)
    assert torch.autograd.gradcheck(lambda q, k, v: K.field_attention(q, k, v, mask, kernel="cpp"), (q, k, v))


def test_opcheck():
    q, k, v = attn_inputs(3, 2, 5, 8)
    mask = key_mask(3, 5)
    torch.library.opcheck(torch.ops.msrec.field_attention.default, (q, k, v, mask), {"impl": "cpp"})
    torch.library.opcheck(torch.ops.msrec.field_attention_cpp.default, (q, k, v, mask))  # with its C++ autograd
    torch.library.opcheck(torch.ops.msrec.field_attention_cpp.default, (q, k, v, None))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.msrec.field_attention_cpp(q, k, v, mask)
    torch.library.opcheck(torch.ops.msrec.field_attention_backward_cpp.default,
                          (randn(3, 2, 5, 8, seed=5, requires_grad=False), q, k, v, mask, lse))


def test_wrapper_takes_the_cpp_autograd_path():
    """On CPU the wrapper calls torch.ops.msrec.field_attention_cpp, whose autograd node is C++,
    with the same values and gradients, bit for bit, as the custom op routed to the same kernel."""
    inputs, mask = attn_inputs(6, 2, 7, 8), key_mask(6, 7)
    direct, direct_grads = run_with_grads(lambda q, k, v: K.field_attention(q, k, v, mask), inputs)
    assert type(K.field_attention(*inputs, mask).grad_fn).__name__ == "CppFunction"
    via_op, op_grads = run_with_grads(lambda q, k, v: torch.ops.msrec.field_attention(q, k, v, mask, "cpp")[0],
                                      inputs)
    assert torch.equal(direct, via_op) and all(torch.equal(a, b) for a, b in zip(direct_grads, op_grads))
    with pytest.raises(ValueError, match="shapes differ"):  # the same Python checks run first
        K.field_attention(inputs[0], inputs[1][:, :, :4], inputs[2])


def test_auto_picks_cpp_on_cpu_float():
    q, _, _ = attn_inputs(2, 1, 5, 8)
    assert ops.choose_impl("auto", "field_attention", q) == "cpp"
    assert ops.choose_impl("auto", "field_attention", q.half()) == "reference"


def test_empty_batch():
    q, k, v = attn_inputs(0, 2, 5, 8)
    out = K.field_attention(q, k, v, torch.zeros(0, 5, dtype=torch.bool), kernel="cpp")
    out.sum().backward()
    assert out.shape == (0, 2, 5, 8) and q.grad.shape == q.shape


def test_errors():
    q, k, v = attn_inputs(2, 1, 5, 8)
    with pytest.raises(ValueError, match="float32/float64"):
        K.field_attention(q.detach().half(), k.detach().half(), v.detach().half(), kernel="cpp")
    with pytest.raises(RuntimeError, match="key_padding_mask must be bool"):
        torch.ops.msrec.field_attention_cpp(q, k, v, torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("B,H,F,dh", [(5, 2, 10, 8), (2, 3, 17, 5)])
def test_strided_views_of_a_fused_projection(B, H, F, dh, masked):
    """q, k, v as attention.py passes them: views of one [B, F, 3, H, dh] projection, permuted, not
    copied. The kernel reads them through their strides: the reference's values and gradients,
    the gradients landing in the fused tensor."""
    fused = randn(B, F, 3, H, dh, seed=7).requires_grad_()
    mask = key_mask(B, F) if masked else None
    for q, k, v in [fused.permute(2, 0, 3, 1, 4).unbind(0)]:
        assert not q.is_contiguous() and q.stride(3) == 1
    out, (grad,) = run_with_grads(lambda x: K.field_attention(*x.permute(2, 0, 3, 1, 4).unbind(0), mask, kernel="cpp"),
                                  [fused])
    ref, (ref_grad,) = run_with_grads(lambda x: field_attention_ref(*x.permute(2, 0, 3, 1, 4).unbind(0), mask), [fused])
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    torch.testing.assert_close(grad, ref_grad, **tol(torch.float32))
    # a view whose dh is not contiguous is copied first: the same values
    q, k, v = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in fused.detach().permute(2, 0, 3, 1, 4).unbind(0))
    torch.testing.assert_close(torch.ops.msrec.field_attention_cpp(q, k, v, mask)[0], ref, **tol(torch.float32))
