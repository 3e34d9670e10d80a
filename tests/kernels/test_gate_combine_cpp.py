"""gate_combine's C++ CPU kernel (csrc/gate_combine.cpp, impl "cpp") against the PyTorch reference:
forward and backward, strided expert inputs (PLE's transposed [E, B, D] stack), masked gates,
threads, fp64 gradcheck, opcheck, routing of "auto", and its errors.

Needs the extension built into the venv (`make setup` builds it). Skipped when it is not, unless
MSREC_REQUIRE_CSRC=1 (as `make test` sets), which turns the skip into a failure.
"""
import pytest
import torch

import msrec_dist.kernels as K
from msrec_dist.kernels import ops
from msrec_dist.kernels.ref_gate_combine import gate_combine_ref

from .test_ops import GATE_SHAPES, gate_inputs
from .utils import cpp_kernel_mark, randn, run_with_grads, tol

pytestmark = cpp_kernel_mark("gate_combine")


def cpp(y, g):
    return K.gate_combine(y, g, kernel="cpp")


def assert_matches_reference(inputs, dtype=torch.float32):
    out, grads = run_with_grads(cpp, inputs)
    ref, ref_grads = run_with_grads(gate_combine_ref, inputs)
    torch.testing.assert_close(out, ref, **tol(dtype))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,E,T,D", GATE_SHAPES)
def test_parity(B, E, T, D, dtype):
    assert_matches_reference(gate_inputs(B, E, T, D, dtype), dtype)


def test_strided_experts_and_masked_gates():
    """PLE's call: expert_out is a [B, E, D] view of an [E, B, D] tensor, gate logits carry -inf
    for the experts a gate may not use. d expert_out comes back with the view's strides."""
    E, B, T, D = 4, 37, 3, 16
    stack = randn(E, B, D, seed=2, requires_grad=False)
    mask = torch.tensor([[0.0, float("-inf"), 0.0, 0.0], [float("-inf"), 0.0, 0.0, 0.0], [0.0] * 4])  # [T, E]
    logits = (randn(T, B, E, seed=3, requires_grad=False) + mask[:, None, :]).requires_grad_()
    y = stack.requires_grad_().transpose(0, 1)  # [B, E, D], not contiguous
    assert not y.is_contiguous()
    out = cpp(y, logits)
    grad = randn(T, B, D, seed=4, requires_grad=False)
    d_y, d_logits = torch.ops.msrec.gate_combine_backward_cpp(grad, y.detach(), logits.detach())
    assert d_y.stride() == y.stride()
    out.backward(grad)
    ref = gate_combine_ref(y.detach().contiguous(), logits.detach())
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    y_ref = y.detach().contiguous().requires_grad_()
    l_ref = logits.detach().clone().requires_grad_()
    gate_combine_ref(y_ref, l_ref).backward(grad)
    torch.testing.assert_close(stack.grad.transpose(0, 1), y_ref.grad, **tol(torch.float32))
    torch.testing.assert_close(logits.grad, l_ref.grad, **tol(torch.float32))
    assert logits.grad[0, :, 1].eq(0).all()  # masked expert: zero gradient, no NaN


def test_many_threads_agree():
    """Large B splits over at::parallel_for chunks; the result does not depend on the split."""
    inputs = gate_inputs(4099, 5, 3, 24)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_grads = run_with_grads(cpp, inputs)
        torch.set_num_threads(max(2, threads))
        many, many_grads = run_with_grads(cpp, inputs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many) and all(torch.equal(a, b) for a, b in zip(one_grads, many_grads))
    assert_matches_reference(inputs)


def test_gradcheck_fp64_full_jacobian():
    y, g = gate_inputs(5, 3, 2, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(cpp, (y, g))
    # relu=True: away from the kink (no |pre| below the finite-difference step) the Jacobian is exact
    with torch.no_grad():
        y.add_(torch.sign(y) * 0.1)
    assert torch.autograd.gradcheck(lambda a, b: K.gate_combine(a, b, kernel="cpp", relu=True), (y, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_on_strided_pre_activations_matches_reference(dtype):
    """PLE's call with relu=True: the pre-activations are a [B, E, D] view with a row stride wider
    than E*D (a column block of the first level's GEMM shared with the gates) and the gate logits
    a transposed view; values and gradients as the reference over torch.relu, d pre strided as pre."""
    B, E, T, D = 37, 4, 3, 16
    block = randn(B, E * D + 12, dtype=dtype, seed=9, requires_grad=False)
    block[:3, :D] = 0.0  # ReLU's kink: zero gradient, as torch's
    block.requires_grad_()
    pre = block[:, :E * D].view(B, E, D)  # strides (E*D + 12, D, 1)
    logits = randn(B, T, E, dtype=dtype, seed=10).transpose(0, 1)  # [T, B, E], not contiguous
    out = K.gate_combine(pre, logits, kernel="cpp", relu=True)
    grad = randn(T, B, D, dtype=dtype, seed=11, requires_grad=False)
    d_pre, _ = torch.ops.msrec.gate_combine_backward_cpp(grad, pre.detach(), logits.detach(), True)
    assert d_pre.shape == pre.shape
    out.backward(grad)
    p_ref = pre.detach().clone().requires_grad_()
    l_ref = logits.detach().clone().requires_grad_()
    ref = gate_combine_ref(torch.relu(p_ref), l_ref)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, **tol(dtype))
    torch.testing.assert_close(block.grad[:, :E * D].view(B, E, D), p_ref.grad, **tol(dtype))
    assert block.grad[:, E * D:].eq(0).all() and block.grad[:3, :D].eq(0).all()
    torch.testing.assert_close(d_pre, p_ref.grad, **tol(dtype))


def test_opcheck():
    y, g = gate_inputs(5, 3, 2, 8)
    torch.library.opcheck(torch.ops.msrec.gate_combine.default, (y, g), {"impl": "cpp"})
    torch.library.opcheck(torch.ops.msrec.gate_combine.default, (y, g), {"impl": "cpp", "relu": True})
    torch.library.opcheck(torch.ops.msrec.gate_combine_cpp.default, (y, g, True))
    torch.library.opcheck(torch.ops.msrec.gate_combine_cpp.default, (y, g))  # with its C++ autograd
    y, g = (t.detach() for t in (y, g))
    torch.library.opcheck(torch.ops.msrec.gate_combine_cpp.default, (y, g))
    torch.library.opcheck(torch.ops.msrec.gate_combine_backward_cpp.default, (randn(2, 5, 8, seed=5), y, g))


def test_wrapper_takes_the_cpp_autograd_path():
    """On CPU the wrapper calls torch.ops.msrec.gate_combine_cpp, whose autograd node is C++
    (no Python custom op in forward or backward), with the same values and gradients, bit for
    bit, as the custom op msrec::gate_combine routed to the same kernel."""
    y, g = gate_inputs(33, 4, 3, 16)
    y_t = y.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # PLE's strided view
    direct, direct_grads = run_with_grads(lambda a, b: K.gate_combine(a, b), (y_t, g))
    out = K.gate_combine(y_t, g)
    assert type(out.grad_fn).__name__ == "CppFunction"  # the C++ autograd::Function's node
    via_op, op_grads = run_with_grads(lambda a, b: torch.ops.msrec.gate_combine(a, b, "cpp"), (y_t, g))
    assert torch.equal(direct, via_op) and all(torch.equal(a, b) for a, b in zip(direct_grads, op_grads))
    with pytest.raises(ValueError, match="gate_logits"):  # the same Python checks run first
        K.gate_combine(y_t, g[:, :5])


def test_auto_picks_cpp_on_cpu_float():
    y, _ = gate_inputs(4, 3, 2, 8)
    assert ops.choose_impl("auto", "gate_combine", y) == "cpp"
    assert ops.choose_impl("auto", "gate_combine", y.half()) == "reference"


def test_empty_batch():
    y, g = gate_inputs(0, 3, 2, 8)
    out = cpp(y, g)
    out.sum().backward()
    assert out.shape == (2, 0, 8) and y.grad.shape == y.shape


def test_errors():
    y, g = gate_inputs(4, 3, 2, 8)
    with pytest.raises(ValueError, match="float32/float64"):
        K.gate_combine(y.detach().half(), g.detach().half(), kernel="cpp")
    with pytest.raises(RuntimeError, match="at most 64 experts"):
        torch.ops.msrec.gate_combine_cpp(torch.zeros(2, 65, 4), torch.zeros(1, 2, 65))


def test_extreme_and_fully_masked_logits():
    """The softmax's polynomial exp (csrc/vec_math.h, 8 samples per SIMD lane) over the whole
    range: logits of ±1e4 and ±80 (exp underflows to 0 where the reference's does), the exact
    ties of a constant row, and a gate with every expert masked (NaN, as torch.softmax), in a
    batch that is not a multiple of the 8 lanes."""
    B, E, T, D = 11, 4, 3, 8
    y = randn(B, E, D, seed=6, requires_grad=False)
    logits = torch.zeros(T, B, E)
    logits[0] = torch.tensor([1e4, -1e4, 0.0, 80.0])
    logits[1] = torch.tensor([-80.0, 80.0, -87.0, 88.0])
    logits[2, :5] = float("-inf")  # samples 0..4: gate 2 sees no expert
    logits[2, 5:] = randn(B - 5, E, seed=7, requires_grad=False) * 30
    out = cpp(y, logits)
    ref = gate_combine_ref(y, logits)
    assert out[2, :5].isnan().all() and ref[2, :5].isnan().all()
    torch.testing.assert_close(out, ref, equal_nan=True, **tol(torch.float32))
    grad = randn(T, B, D, seed=8, requires_grad=False)
    grad[2, :5] = 0  # keep the NaN gate out of the gradient check
    d_y, d_logits = torch.ops.msrec.gate_combine_backward_cpp(grad, y, logits)
    y_ref, l_ref = y.clone().requires_grad_(), logits.clone().requires_grad_()
    gate_combine_ref(y_ref, l_ref).backward(grad)
    torch.testing.assert_close(d_logits[:2], l_ref.grad[:2], **tol(torch.float32))
    torch.testing.assert_close(d_logits[2, 5:], l_ref.grad[2, 5:], **tol(torch.float32))
