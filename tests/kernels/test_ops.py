"""gate_combine and field_attention: Triton (interpreted) vs PyTorch reference, forward and
backward, field_attention's saved log-sum-exp, fp64 gradcheck, opcheck,
torch.compile(fullgraph=True), shape checks, routing."""
import importlib
import math
import subprocess
import sys

import pytest
import torch

import msrec_dist.kernels as K
from msrec_dist.kernels.ref_field_attention import field_attention_ref
from msrec_dist.kernels.ref_gate_combine import gate_combine_ref

from .utils import key_mask, randn, run_with_grads, tol

# (B, E, T, D): odd E, T, D; B not a multiple of the interpreter's BLOCK_B (4)
GATE_SHAPES = [(5, 1, 1, 8), (5, 5, 3, 24), (13, 5, 1, 8), (6, 1, 3, 24), (3, 32, 8, 40)]
# (B, H, F, dh): odd F and dh; B not a multiple of the interpreter's BLOCK_B (2)
ATTN_SHAPES = [(3, 2, 3, 8), (3, 1, 7, 24), (3, 2, 13, 8), (3, 1, 39, 24), (1, 1, 2, 8)]


def gate_inputs(B, E, T, D, dtype=torch.float32):
    return randn(B, E, D, dtype=dtype, seed=0), randn(T, B, E, dtype=dtype, seed=1)


def attn_inputs(B, H, F, dh, dtype=torch.float32):
    return [randn(B, H, F, dh, dtype=dtype, seed=s) for s in range(3)]


@pytest.mark.parametrize("B,E,T,D", GATE_SHAPES)
def test_gate_combine_parity(B, E, T, D):
    inputs = gate_inputs(B, E, T, D)
    out, grads = run_with_grads(lambda y, g: K.gate_combine(y, g, kernel="triton"), inputs)
    ref, ref_grads = run_with_grads(gate_combine_ref, inputs)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("B,H,F,dh", ATTN_SHAPES)
def test_field_attention_parity(B, H, F, dh, masked):
    mask = key_mask(B, F) if masked else None
    inputs = attn_inputs(B, H, F, dh)
    out, grads = run_with_grads(lambda q, k, v: K.field_attention(q, k, v, mask, kernel="triton"), inputs)
    ref, ref_grads = run_with_grads(lambda q, k, v: field_attention_ref(q, k, v, mask), inputs)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol(torch.float32))
    if masked:  # sample 0 has every key padded: exact zeros, no NaN
        assert not any(t.isnan().any() for t in (out, *grads))
        assert all(t[0].eq(0).all() for t in (out, *grads))


def lse_of_scores(q, k, mask):
    """torch.logsumexp of the masked scaled scores [B, H, F]; +inf where every key is padded."""
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return lse.masked_fill(lse == float("-inf"), float("inf"))


@pytest.mark.parametrize("kernel", ["triton", "reference"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("B,H,F,dh", ATTN_SHAPES)
def test_field_attention_lse(B, H, F, dh, masked, kernel):
    mask = key_mask(B, F) if masked else None
    q, k, v = attn_inputs(B, H, F, dh)
    out, lse = torch.ops.msrec.field_attention(q, k, v, mask, kernel)
    assert lse.shape == (B, H, F) and lse.dtype == torch.float32 and not lse.requires_grad
    torch.testing.assert_close(lse, lse_of_scores(q, k, mask).detach(), **tol(torch.float32))
    if masked:
        assert lse[0].eq(float("inf")).all()


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_field_attention_lse_fp64(kernel):
    q, k, v = attn_inputs(3, 2, 5, 8, dtype=torch.float64)
    mask = key_mask(3, 5)
    _, lse = torch.ops.msrec.field_attention(q, k, v, mask, kernel)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, lse_of_scores(q, k, mask).detach(), **tol(torch.float64))


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_field_attention_backward_uses_saved_lse(kernel):
    # P = exp(s - lse): lse + log 2 halves P, hence dv = P^T dout, in both backward paths
    q, k, v = attn_inputs(3, 2, 7, 8, dtype=torch.float64)
    mask = key_mask(3, 7)
    do = randn(3, 2, 7, 8, dtype=torch.float64, seed=5, requires_grad=False)
    with torch.no_grad():
        out, lse = torch.ops.msrec.field_attention(q, k, v, mask, kernel)
        _, _, dv = torch.ops.msrec.field_attention_backward(do, q, k, v, mask, out, lse, kernel)
        _, _, dv_half = torch.ops.msrec.field_attention_backward(do, q, k, v, mask, out, lse + math.log(2), kernel)
    torch.testing.assert_close(dv_half, dv / 2, **tol(torch.float64))


def test_field_attention_ref_matches_sdpa():
    q, k, v = attn_inputs(2, 2, 7, 8)
    mask = key_mask(3, 7)[1:]  # no fully padded row: SDPA gives NaN there
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :])
    torch.testing.assert_close(field_attention_ref(q, k, v, mask), sdpa, **tol(torch.float32))


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_gradcheck_fp64(kernel):
    # fast_mode checks one random projection of the Jacobian: each interpreted launch costs
    # ~10 ms per program, and the full Jacobian needs two launches per input element.
    y, g = gate_inputs(5, 3, 2, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y, g: K.gate_combine(y, g, kernel=kernel), (y, g), fast_mode=True)
    q, k, v = attn_inputs(3, 2, 5, 8, dtype=torch.float64)
    mask = key_mask(3, 5)
    assert torch.autograd.gradcheck(lambda q, k, v: K.field_attention(q, k, v, mask, kernel=kernel), (q, k, v),
                                    fast_mode=True)


@pytest.mark.slow
def test_gradcheck_fp64_full_jacobian():
    y, g = gate_inputs(5, 3, 2, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y, g: K.gate_combine(y, g, kernel="triton"), (y, g))
    q, k, v = attn_inputs(2, 1, 5, 8, dtype=torch.float64)
    mask = key_mask(2, 5)
    assert torch.autograd.gradcheck(lambda q, k, v: K.field_attention(q, k, v, mask, kernel="triton"), (q, k, v))


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_opcheck(kernel):
    y, g = gate_inputs(5, 3, 2, 8)
    torch.library.opcheck(torch.ops.msrec.gate_combine.default, (y, g), {"impl": kernel})
    q, k, v = attn_inputs(3, 2, 5, 8)
    torch.library.opcheck(torch.ops.msrec.field_attention.default, (q, k, v, key_mask(3, 5)), {"impl": kernel})
    torch.library.opcheck(torch.ops.msrec.field_attention.default, (q, k, v, None), {"impl": kernel})
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.msrec.field_attention(q, k, v, key_mask(3, 5), kernel)
    torch.library.opcheck(torch.ops.msrec.field_attention_backward.default,
                          (torch.randn_like(out), q, k, v, key_mask(3, 5), out, lse, kernel))


def test_torch_compile_fullgraph():
    def block(y, g, q, k, v, mask):
        mixed = K.gate_combine(y, g, kernel="triton")                    # [T, B, D]
        att = K.field_attention(q, k, v, mask, kernel="triton")          # [B, H, F, dh]
        return mixed.square().sum() + att.square().sum()

    mask = key_mask(3, 7)
    inputs = [*gate_inputs(3, 5, 2, 8), *attn_inputs(3, 2, 7, 8)]
    loss = torch.compile(block, fullgraph=True)(*inputs, mask)
    loss.backward()
    grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    block(*inputs, mask).backward()
    for x, got in zip(inputs, grads):
        torch.testing.assert_close(got, x.grad, **tol(torch.float32))


def test_torch_compile_inductor_default_impl():
    """Inductor (torch.compile's default backend) through both ops with the default impl="auto",
    as the model calls them on CPU: an op argument named `kernel` used to clash with inductor's
    own FallbackKernel.create(kernel=...) and fail the compile."""
    def block(y, g, q, k, v):
        return K.gate_combine(y, g).square().sum() + K.field_attention(q, k, v).square().sum()

    inputs = [*gate_inputs(3, 5, 2, 8), *attn_inputs(3, 2, 7, 8)]
    loss = torch.compile(block, fullgraph=True)(*inputs)
    loss.backward()
    grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    block(*inputs).backward()
    for x, got in zip(inputs, grads):
        torch.testing.assert_close(got, x.grad, **tol(torch.float32))


def test_eager_triton_skips_the_custom_op():
    """In eager mode the wrappers run Triton through ops.TritonGateCombine / TritonFieldAttention
    (autograd.Functions, no custom-op dispatch), with the same values and gradients, bit for bit,
    as msrec::gate_combine / msrec::field_attention routed to the same kernels, strided inputs
    and a key mask included; the same shape checks run first."""
    y, g = gate_inputs(9, 4, 3, 16)
    y_t = y.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # PLE's strided view
    assert type(K.gate_combine(y_t, g, kernel="triton").grad_fn).__name__ == "TritonGateCombineBackward"
    direct, direct_grads = run_with_grads(lambda a, b: K.gate_combine(a, b, kernel="triton"), (y_t, g))
    via_op, op_grads = run_with_grads(lambda a, b: torch.ops.msrec.gate_combine(a, b, "triton"), (y_t, g))
    assert torch.equal(direct, via_op) and all(torch.equal(a, b) for a, b in zip(direct_grads, op_grads))
    assert direct_grads[0].stride() == y_t.stride()
    with pytest.raises(ValueError, match="gate_logits"):
        K.gate_combine(y_t, g[:, :5], kernel="triton")

    q, k, v = attn_inputs(5, 2, 7, 8)
    for mask in (key_mask(5, 7), None):
        att = K.field_attention(q, k, v, mask, kernel="triton")
        assert type(att.grad_fn).__name__ == "TritonFieldAttentionBackward"
        direct, direct_grads = run_with_grads(lambda a, b, c: K.field_attention(a, b, c, mask, kernel="triton"),
                                              (q, k, v))
        via_op, op_grads = run_with_grads(
            lambda a, b, c: torch.ops.msrec.field_attention(a, b, c, mask, "triton")[0], (q, k, v))
        assert torch.equal(direct, via_op) and all(torch.equal(a, b) for a, b in zip(direct_grads, op_grads))


def test_fx_trace_shows_ops():
    class Block(torch.nn.Module):
        def forward(self, y, g, q, k, v):
            return K.gate_combine(y, g), K.field_attention(q, k, v)

    code = torch.fx.symbolic_trace(Block()).code
    assert "torch.ops.msrec.gate_combine" in code and "torch.ops.msrec.field_attention" in code


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_empty_batch(kernel):
    y, g = gate_inputs(0, 3, 2, 8)
    assert K.gate_combine(y, g, kernel=kernel).shape == (2, 0, 8)
    q, k, v = attn_inputs(0, 2, 5, 8)
    out = K.field_attention(q, k, v, torch.zeros(0, 5, dtype=torch.bool), kernel=kernel)
    out.sum().backward()
    assert out.shape == (0, 2, 5, 8) and q.grad.shape == q.shape


def test_shape_errors():
    y, g = gate_inputs(4, 3, 2, 8)
    with pytest.raises(ValueError, match=r"must be \[T, 4, 3\]"):
        K.gate_combine(y, g[:, :, :2])
    with pytest.raises(ValueError, match="dtypes differ"):
        K.gate_combine(y, g.double())
    with pytest.raises(ValueError, match="kernel must be one of"):
        K.gate_combine(y, g, kernel="cuda")
    q, k, v = attn_inputs(2, 1, 5, 8)
    with pytest.raises(ValueError, match="shapes differ"):
        K.field_attention(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[2, 5\]"):
        K.field_attention(q, k, v, torch.zeros(2, 4, dtype=torch.bool))


def test_public_names_are_the_wrappers():
    """The Triton modules (triton_<op>.py) are not named like the wrappers: importing them leaves
    msrec_dist.kernels.gate_combine / .field_attention the functions."""
    importlib.import_module("msrec_dist.kernels.triton_gate_combine")
    importlib.import_module("msrec_dist.kernels.triton_field_attention")
    assert callable(K.gate_combine) and callable(K.field_attention)
    from msrec_dist.kernels import field_attention, field_attention_ref, gate_combine, gate_combine_ref
    assert gate_combine is K.gate_combine and field_attention is K.field_attention
    assert callable(gate_combine_ref) and callable(field_attention_ref)


def test_import_is_cheap_triton_free_and_self_contained():
    """Importing msrec_dist.kernels imports neither triton nor any other module of msrec_dist
    (the extension msrec_dist._C aside, loaded by kernels/native.py)."""
    code = ("import sys, msrec_dist.kernels; assert 'triton' not in sys.modules, 'triton imported'\n"
            "other = [m for m in sys.modules if m.startswith('msrec_dist.') and m != 'msrec_dist._C'\n"
            "         and not m.startswith('msrec_dist.kernels')]\n"
            "assert not other, other")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gate_combine_prune_keeps_a_config():
    gc = importlib.import_module("msrec_dist.kernels.triton_gate_combine")
    for T, E, D in [(8, 32, 512), (2, 4, 64), (1, 1, 8)]:
        meta = gc.meta(T, E, D, torch.float32)
        kept = gc._keep(gc.FWD_CONFIGS, {}, **meta)
        assert kept and all(c.kwargs["BLOCK_B"] * meta["T_PAD"] * meta["BLOCK_D"] <= 16384
                            or c.kwargs["BLOCK_B"] == 4 for c in kept)
        meta = gc.meta(T, E, D, torch.float32, backward=True)
        kept = gc._keep_bwd(gc.BWD_CONFIGS, {}, **meta)
        assert kept and all(c.kwargs["BLOCK_B"] * meta["E_PAD"] * meta["BLOCK_DB"] <= 4096
                            or c.kwargs["BLOCK_B"] == 1 for c in kept)


def test_field_attention_tiles_past_shared_memory_run_the_reference():
    fa = importlib.import_module("msrec_dist.kernels.triton_field_attention")
    assert fa.fits(128, 128, torch.float32, backward=False) and fa.fits(128, 128, torch.bfloat16, backward=True)
    assert not fa.fits(128, 128, torch.float32, backward=True) and not fa.fits(65, 72, torch.float32, backward=True)
    assert fa.fits(64, 128, torch.float32, backward=True) and fa.fits(39, 24, torch.float64, backward=True)
    # F = dh = 128 in fp32: forward interpreted, backward through the reference; same values
    inputs = attn_inputs(1, 1, 128, 128)
    mask = key_mask(2, 128)[1:]
    out, grads = run_with_grads(lambda q, k, v: K.field_attention(q, k, v, mask, kernel="triton"), inputs)
    ref, ref_grads = run_with_grads(lambda q, k, v: field_attention_ref(q, k, v, mask), inputs)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("kernel", ["triton", "reference"])
@pytest.mark.parametrize("B,E,T,D", GATE_SHAPES[1:3])
def test_gate_combine_relu_is_gate_combine_of_the_relu(B, E, T, D, kernel):
    """relu=True: the op takes the experts' pre-activations and applies their ReLU itself
    (forward and gradient), the same as gate_combine(torch.relu(pre)) through autograd; zeros in
    the input (ReLU's kink) get a zero gradient, as torch.relu's backward gives them."""
    pre, logits = gate_inputs(B, E, T, D)
    with torch.no_grad():
        pre[0, 0, :4] = 0.0  # exact zeros: masked like torch.relu's backward (input <= 0)
    out, grads = run_with_grads(lambda y, g: K.gate_combine(y, g, kernel=kernel, relu=True), (pre, logits))
    ref, ref_grads = run_with_grads(lambda y, g: gate_combine_ref(torch.relu(y), g), (pre, logits))
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol(torch.float32))
    assert grads[0][0, 0, :4].eq(0).all() and (grads[0] == 0).float().mean() > 0.3  # about half masked
    plain = K.gate_combine(pre, logits, kernel=kernel)  # relu=False: the identity, not the ReLU
    assert not torch.allclose(plain, out)
