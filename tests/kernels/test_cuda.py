"""The Triton kernels compiled for a real GPU (not the interpreter) against a float64 reference.

Skipped without CUDA, so CI (no GPU) skips every test here; they ran on a lent GPU with
benchmarks/gpu_check.sh, which saves their log under benchmarks/results/. Run there as:
    TRITON_INTERPRET=0 MSREC_TRITON_AUTOTUNE=0 pytest --noconftest tests/kernels/test_cuda.py
(--noconftest: tests/conftest.py needs torchrec, which the GPU machine lacks; MSREC_TRITON_AUTOTUNE=0:
one config per key, or compiling every config for each of ~40 keys would take minutes; the
benchmark autotunes and checks the tuned kernels' outputs at product shapes).

Per case, forward output and every input gradient:
    err = ||x - x64|| / ||x64||, x64 = the reference in float64 on the upcast inputs
and the kernel must be no worse than max(4 x the eager reference's own error in the same dtype,
a floor per dtype). Every output buffer is first poisoned with NaN through the caching
allocator, so an element the kernel never writes shows up as NaN.
"""
import pytest
import torch

import msrec_dist.kernels as K
from benchmarks.kernels import rel_err
from msrec_dist.kernels.ref_field_attention import field_attention_ref
from msrec_dist.kernels.ref_gate_combine import gate_combine_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# (B, E, T, D): odd sizes, D above one column tile (BLOCK_D <= 1024 / T_PAD), the extremes
GATE_SHAPES = [(5, 1, 1, 8), (5, 5, 3, 24), (13, 5, 1, 8), (3, 32, 8, 40), (1000, 2, 2, 500),
               (100003, 8, 3, 128), (65537, 16, 4, 256), (4099, 32, 8, 512)]
# (B, H, F, dh): odd F and dh, B not a multiple of any tile, the extremes (F 2..128, dh 8..128)
ATTN_SHAPES = [(3, 2, 3, 8), (3, 1, 7, 24), (3, 2, 13, 8), (3, 1, 39, 24), (1, 1, 2, 8),
               (4097, 2, 16, 16), (1001, 4, 64, 64), (257, 1, 100, 72), (513, 2, 128, 128)]


def poison(*shapes_dtypes) -> None:
    """Leave NaN-filled blocks of exactly these sizes in the caching allocator, so the op's next
    allocations of those sizes (its outputs) start as NaN rather than as earlier results."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


def run(fn, inputs, grad_out):
    """(out, grads) of fn(*inputs) for the upstream gradient grad_out."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


def compare(name, kernel_fn, ref_fn, inputs, grad_out, out_shapes):
    """Kernel vs float64 reference, with the same-dtype eager reference as the yardstick."""
    dtype = inputs[0].dtype
    up = [x.double() for x in inputs]
    ref64, grads64 = run(ref_fn, up, grad_out.double())
    ref_same, grads_same = run(ref_fn, inputs, grad_out)
    poison(*out_shapes)
    got, grads = run(kernel_fn, inputs, grad_out)
    report, bad = [], []
    for what, x, same, x64 in [("out", got, ref_same, ref64)] + [
            (f"grad{i}", g, gs, g64) for i, (g, gs, g64) in enumerate(zip(grads, grads_same, grads64))]:
        assert x.dtype == dtype and x.shape == x64.shape, (name, what)
        err, ref_err = rel_err(x, x64), rel_err(same, x64)
        report.append(f"{what} {err:.2e} (eager {ref_err:.2e})")
        if x.isnan().any():
            bad.append(f"{what}: {x.isnan().sum().item()} NaN (unwritten elements, or real NaN)")
        elif not err <= max(4 * ref_err, FLOOR[dtype]):
            bad.append(f"{what}: rel err {err:.3e}, eager {ref_err:.3e}")
    print(f"{name}: " + ", ".join(report) + (" MISMATCH " + "; ".join(bad) if bad else ""))
    assert not bad, f"{name}: " + "; ".join(bad)


def test_poison_reaches_the_next_allocation():
    """The NaN poisoning is what makes unwritten outputs visible: check that it takes."""
    poison(((4099, 8, 3, 128), torch.bfloat16))
    assert torch.empty((4099, 8, 3, 128), dtype=torch.bfloat16, device="cuda").isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,E,T,D", GATE_SHAPES)
def test_gate_combine_gpu(B, E, T, D, dtype):
    gen = torch.Generator(device="cuda").manual_seed(B * 7 + E)
    y = torch.randn(B, E, D, device="cuda", generator=gen).to(dtype)
    x = (2 * torch.randn(T, B, E, device="cuda", generator=gen)).to(dtype)
    dout = torch.randn(T, B, D, device="cuda", generator=gen).to(dtype)
    compare(f"gate_combine B={B} E={E} T={T} D={D} {dtype}",
            lambda y, x: K.gate_combine(y, x, kernel="triton"), gate_combine_ref, [y, x], dout,
            [((T, B, D), dtype), ((B, E, D), dtype), ((T, B, E), dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,E,T,D", GATE_SHAPES[:3])
def test_gate_combine_relu_gpu(B, E, T, D, dtype):
    """relu=True (PLE's call: the experts' pre-activations, ReLU inside the kernel) against the
    reference over torch.relu."""
    gen = torch.Generator(device="cuda").manual_seed(B * 5 + E)
    y = torch.randn(B, E, D, device="cuda", generator=gen).to(dtype)
    x = (2 * torch.randn(T, B, E, device="cuda", generator=gen)).to(dtype)
    dout = torch.randn(T, B, D, device="cuda", generator=gen).to(dtype)
    compare(f"gate_combine relu B={B} E={E} T={T} D={D} {dtype}",
            lambda y, x: K.gate_combine(y, x, kernel="triton", relu=True),
            lambda y, x: gate_combine_ref(torch.relu(y), x), [y, x], dout,
            [((T, B, D), dtype), ((B, E, D), dtype), ((T, B, E), dtype)])


# The largest tiles (F = dh = 128) take the longest to compile: masked in every dtype, and
# unmasked in bf16 only.
ATTN_CASES = [(*shape, dtype, masked) for shape in ATTN_SHAPES for dtype in DTYPES for masked in (True, False)
              if masked or dtype == torch.bfloat16 or shape[2] * shape[3] < 128 * 128]


@pytest.mark.parametrize("B,H,F,dh,dtype,masked", ATTN_CASES)
def test_field_attention_gpu(B, H, F, dh, dtype, masked):
    gen = torch.Generator(device="cuda").manual_seed(B * 11 + F)
    q, k, v = (torch.randn(B, H, F, dh, device="cuda", generator=gen).to(dtype) for _ in range(3))
    dout = torch.randn(B, H, F, dh, device="cuda", generator=gen).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(B, F, device="cuda", generator=gen) < 0.4
        mask[0] = True                 # a fully padded sample: zeros out, zero grads
        mask[1:, 0] = False
    shape = (B, H, F, dh)
    compare(f"field_attention B={B} H={H} F={F} dh={dh} {dtype} mask={masked}",
            lambda q, k, v: K.field_attention(q, k, v, mask, kernel="triton"),
            lambda q, k, v: field_attention_ref(q, k, v, mask), [q, k, v], dout,
            [(shape, dtype)] * 4)


def test_field_attention_million_samples():
    """B past a million on grid axis 0 (bf16): sampled rows against the float64 reference."""
    B, H, F, dh = 1_048_579, 1, 16, 16
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(B, H, F, dh, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.rand(B, F, device="cuda", generator=gen) < 0.3
    mask[:, 0] = False
    poison(((B, H, F, dh), torch.bfloat16))
    out = K.field_attention(q, k, v, mask, kernel="triton")
    rows = torch.cat([torch.arange(64, device="cuda"), torch.randint(0, B, (4096,), device="cuda", generator=gen),
                      torch.arange(B - 64, B, device="cuda")])
    ref = field_attention_ref(*(t[rows].double() for t in (q, k, v)), mask[rows])
    assert not out.isnan().any()
    assert rel_err(out[rows], ref) <= FLOOR[torch.bfloat16]


def test_gate_combine_two_million_samples():
    B, E, T, D = 2_000_003, 4, 2, 64
    gen = torch.Generator(device="cuda").manual_seed(4)
    y = torch.randn(B, E, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    x = torch.randn(T, B, E, device="cuda", generator=gen, dtype=torch.bfloat16)
    poison(((T, B, D), torch.bfloat16))
    out = K.gate_combine(y, x, kernel="triton")
    rows = torch.cat([torch.randint(0, B, (8192,), device="cuda", generator=gen),
                      torch.arange(B - 64, B, device="cuda")])
    ref = gate_combine_ref(y[rows].double(), x[:, rows].double())
    assert not out.isnan().any()
    assert rel_err(out[:, rows], ref) <= FLOOR[torch.bfloat16]


def test_model_kernels_auto_picks_triton_on_cuda():
    y = torch.randn(4, 3, 8, device="cuda")
    assert K.ops.choose_impl("auto", "gate_combine", y) == "triton"
