"""Schemas, fakes, autograd and routing for the hot ops, registered under torch.ops.msrec.

    msrec::gate_combine(Tensor expert_out, Tensor gate_logits, str impl="auto", bool relu=False) -> Tensor
    msrec::field_attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask=None,
                           str impl="auto") -> (Tensor out, Tensor lse)

plus their backward ops (msrec::gate_combine_backward, msrec::field_attention_backward), each
a custom op with a fake so torch.compile traces through forward and backward. field_attention
also returns the row log-sum-exp lse [B, H, F] (fp32, fp64 for fp64 inputs; not
differentiable), which its backward takes to recompute the probabilities;
msrec_dist.kernels.field_attention returns out alone.

impl (the wrappers' `kernel=`; not named `kernel` in the schema because inductor's fallback
for custom ops takes a `kernel` argument of its own and fails on the clash), one op name with
three implementations:
    "auto"       Triton on CUDA tensors; on CPU the C++ kernel (fp32/fp64, extension
                 msrec_dist._C built), else the PyTorch reference
    "triton"     the Triton kernel on any device (on CPU only under TRITON_INTERPRET=1)
    "cpp"        the C++ CPU kernel (csrc/gate_combine.cpp, csrc/field_attention.cpp:
                 torch.ops.msrec.<op>_cpp and its backward); an error where it is not built. The
                 wrappers in msrec_dist.kernels call <op>_cpp directly (its autograd is C++)
                 instead of this custom op, which stays for FX, opcheck and explicit calls
    "reference"  the PyTorch reference, always (the definition and the tests' oracle)
Shapes are checked here, once; empty batches return before any launch. The Triton modules are
imported on first use, so importing this module never needs triton.
"""
import importlib
from typing import Optional, Tuple

import torch

from . import native
from .ref_field_attention import field_attention_backward_ref, field_attention_forward_ref
from .ref_gate_combine import acc_dtype, gate_combine_backward_ref, gate_combine_ref

KERNELS = ("auto", "triton", "cpp", "reference")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CPP_DTYPES = (torch.float32, torch.float64)


def _load_cpp_kernels() -> frozenset:
    """Names of the ops with a C++ CPU kernel in the extension msrec_dist._C (loaded by
    kernels/native.py); empty when it is not built."""
    built = frozenset(name for name in ("gate_combine", "field_attention") if native.has_op(f"{name}_cpp"))
    # fakes, so the C++ ops trace (torch.compile, opcheck) on their own too
    if "gate_combine" in built:
        torch.library.register_fake("msrec::gate_combine_cpp")(
            lambda y, g, relu=False: y.new_empty((g.shape[0], y.shape[0], y.shape[2])))
        torch.library.register_fake("msrec::gate_combine_backward_cpp")(
            lambda grad, y, g, relu=False: (torch.empty_like(y), g.new_empty(g.shape)))
    if "field_attention" in built:
        torch.library.register_fake("msrec::field_attention_cpp")(
            lambda q, k, v, mask: (q.new_empty(q.shape), q.new_empty(q.shape[:3])))
        torch.library.register_fake("msrec::field_attention_backward_cpp")(
            lambda grad, q, k, v, mask, lse: (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)))
    return built


def choose_impl(impl: str, op: str, x: torch.Tensor) -> str:
    """The implementation that runs: "triton", "cpp" or "reference" (see the module docstring)."""
    if impl not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {impl!r}")
    if impl == "auto":
        if x.is_cuda:
            return "triton"
        return "cpp" if x.device.type == "cpu" and x.dtype in _CPP_DTYPES and op in cpp_kernels() else "reference"
    if impl == "cpp":
        _check(op in cpp_kernels(), f"{op}: kernel='cpp' needs the C++ extension with a {op} kernel "
                                    f"(built: {sorted(cpp_kernels()) or 'none'}; see csrc/README.md)")
        _check(x.device.type == "cpu" and x.dtype in _CPP_DTYPES,
               f"{op}: kernel='cpp' runs on CPU float32/float64 tensors, got {x.device} {x.dtype}")
    return impl


def _strided_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t with the strides of `like` (what the backward fakes promise: torch.empty_like(input))."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _triton_module(op: str):
    """kernels/triton_<op>.py, imported on first use (it imports triton)."""
    return importlib.import_module(f"{__package__}.triton_{op}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# Loaded at import, not inside a torch.compile trace (dynamo cannot trace register_fake).
_CPP_KERNELS = _load_cpp_kernels()


def cpp_kernels() -> frozenset:
    """Names of the ops with a C++ CPU kernel loaded (empty when msrec_dist._C is not built)."""
    return _CPP_KERNELS


# ---------------------------------------------------------------- gate_combine
def check_gate_combine(expert_out: torch.Tensor, gate_logits: torch.Tensor) -> None:
    _check(expert_out.dim() == 3, f"gate_combine: expert_out must be [B, E, D], got {tuple(expert_out.shape)}")
    _check(gate_logits.dim() == 3, f"gate_combine: gate_logits must be [T, B, E], got {tuple(gate_logits.shape)}")
    (b, e, _), (_, gb, ge) = expert_out.shape, gate_logits.shape
    _check(gb == b and ge == e, f"gate_combine: gate_logits {tuple(gate_logits.shape)} must be [T, {b}, {e}] "
                                f"for expert_out {tuple(expert_out.shape)}")
    _check(expert_out.dtype in _DTYPES, f"gate_combine: unsupported dtype {expert_out.dtype}")
    _check(gate_logits.dtype == expert_out.dtype,
           f"gate_combine: dtypes differ ({expert_out.dtype} vs {gate_logits.dtype})")
    _check(gate_logits.device == expert_out.device, "gate_combine: inputs on different devices")


@torch.library.custom_op("msrec::gate_combine", mutates_args=())
def gate_combine(expert_out: torch.Tensor, gate_logits: torch.Tensor, impl: str = "auto",
                 relu: bool = False) -> torch.Tensor:
    """[B, E, D] expert outputs (pre-activations with `relu`), [T, B, E] gate logits -> [T, B, D]."""
    check_gate_combine(expert_out, gate_logits)
    t, (b, _, d) = gate_logits.shape[0], expert_out.shape
    if b == 0:
        return expert_out.new_empty((t, 0, d))
    return _gate_combine_forward(expert_out, gate_logits, choose_impl(impl, "gate_combine", expert_out), relu)


def _gate_combine_forward(expert_out: torch.Tensor, gate_logits: torch.Tensor, chosen: str,
                          relu: bool) -> torch.Tensor:
    """The chosen implementation's forward on a non-empty, checked batch."""
    if chosen == "triton":
        return _triton_module("gate_combine").gate_combine_fwd(expert_out, gate_logits, relu)
    if chosen == "cpp":
        return torch.ops.msrec.gate_combine_cpp(expert_out, gate_logits, relu)
    return gate_combine_ref(expert_out, gate_logits, relu).contiguous()  # the fake is contiguous


@gate_combine.register_fake
def _(expert_out, gate_logits, impl="auto", relu=False):
    check_gate_combine(expert_out, gate_logits)
    return expert_out.new_empty((gate_logits.shape[0], expert_out.shape[0], expert_out.shape[2]))


@torch.library.custom_op("msrec::gate_combine_backward", mutates_args=())
def gate_combine_backward(
    grad_out: torch.Tensor, expert_out: torch.Tensor, gate_logits: torch.Tensor, impl: str, relu: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad_out [T, B, D] -> (d expert_out [B, E, D] with expert_out's strides, d gate_logits [T, B, E])."""
    if expert_out.shape[0] == 0:
        return torch.zeros_like(expert_out), torch.zeros_like(gate_logits)
    return _gate_combine_backward(grad_out, expert_out, gate_logits,
                                  choose_impl(impl, "gate_combine", expert_out), relu)


def _gate_combine_backward(grad_out, expert_out, gate_logits, chosen: str,
                           relu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The chosen implementation's backward on a non-empty batch, gradients strided as the inputs."""
    if chosen == "cpp":
        d_y, d_logits = torch.ops.msrec.gate_combine_backward_cpp(grad_out, expert_out, gate_logits, relu)
    elif chosen == "triton":
        d_y, d_logits = _triton_module("gate_combine").gate_combine_bwd(grad_out, expert_out, gate_logits, relu)
    else:
        d_y, d_logits = gate_combine_backward_ref(grad_out, expert_out, gate_logits, relu)
    return _strided_like(d_y, expert_out), _strided_like(d_logits, gate_logits)


@gate_combine_backward.register_fake
def _(grad_out, expert_out, gate_logits, impl, relu=False):
    return torch.empty_like(expert_out), torch.empty_like(gate_logits)


def _gate_combine_setup(ctx, inputs, output):
    expert_out, gate_logits, impl, relu = inputs
    ctx.save_for_backward(expert_out, gate_logits)
    ctx.impl, ctx.relu = impl, relu


def _gate_combine_grad(ctx, grad_out):
    expert_out, gate_logits = ctx.saved_tensors
    d_y, d_logits = gate_combine_backward(grad_out, expert_out, gate_logits, ctx.impl, ctx.relu)
    return d_y, d_logits, None, None


gate_combine.register_autograd(_gate_combine_grad, setup_context=_gate_combine_setup)


# ------------------------------------------------------------- field_attention
def check_field_attention(q, k, v, key_padding_mask) -> None:
    _check(q.dim() == 4, f"field_attention: q must be [B, H, F, dh], got {tuple(q.shape)}")
    _check(k.shape == q.shape and v.shape == q.shape,
           f"field_attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check(q.dtype in _DTYPES, f"field_attention: unsupported dtype {q.dtype}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, "field_attention: q, k, v dtypes differ")
    _check(k.device == q.device and v.device == q.device, "field_attention: q, k, v on different devices")
    if key_padding_mask is not None:
        b, _, f, _ = q.shape
        _check(key_padding_mask.shape == (b, f),
               f"field_attention: key_padding_mask must be [{b}, {f}], got {tuple(key_padding_mask.shape)}")
        _check(key_padding_mask.dtype == torch.bool, "field_attention: key_padding_mask must be bool")
        _check(key_padding_mask.device == q.device, "field_attention: key_padding_mask on another device")


def _empty_lse(q: torch.Tensor) -> torch.Tensor:
    """[B, H, F] in the accumulation dtype (fp32, fp64 for fp64 inputs)."""
    return q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


@torch.library.custom_op("msrec::field_attention", mutates_args=())
def field_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None, impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, F, dh], key_padding_mask [B, F] (True = padded) -> (out [B, H, F, dh],
    lse [B, H, F]; +inf for a query whose keys are all padded)."""
    check_field_attention(q, k, v, key_padding_mask)
    if q.shape[0] == 0:
        return q.new_empty(q.shape), _empty_lse(q)
    return _field_attention_forward(q, k, v, key_padding_mask, choose_impl(impl, "field_attention", q))


def _field_attention_forward(q, k, v, key_padding_mask, chosen: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The chosen implementation's (out, lse) on a non-empty, checked batch."""
    if chosen == "triton":
        return _triton_module("field_attention").field_attention_fwd(q, k, v, key_padding_mask)
    if chosen == "cpp":
        return torch.ops.msrec.field_attention_cpp(q, k, v, key_padding_mask)
    out, lse = field_attention_forward_ref(q, k, v, key_padding_mask)
    return out.contiguous(), lse.contiguous()  # the fakes are contiguous


@field_attention.register_fake
def _(q, k, v, key_padding_mask=None, impl="auto"):
    check_field_attention(q, k, v, key_padding_mask)
    # contiguous whatever q's strides (every implementation returns a contiguous out; q may be a
    # permuted view of a fused projection, model/attention.py)
    return q.new_empty(q.shape), _empty_lse(q)


@torch.library.custom_op("msrec::field_attention_backward", mutates_args=())
def field_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, impl: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out [B, H, F, dh], lse [B, H, F] saved by forward -> (dq, dk, dv), each [B, H, F, dh]."""
    if q.shape[0] == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    return _field_attention_backward(grad_out, q, k, v, key_padding_mask, out, lse,
                                     choose_impl(impl, "field_attention", q))


def _field_attention_backward(grad_out, q, k, v, key_padding_mask, out, lse, chosen: str):
    """The chosen implementation's (dq, dk, dv) on a non-empty batch."""
    if chosen == "triton":
        return _triton_module("field_attention").field_attention_bwd(grad_out, q, k, v, key_padding_mask, out, lse)
    if chosen == "cpp":
        return torch.ops.msrec.field_attention_backward_cpp(grad_out, q, k, v, key_padding_mask, lse)
    return tuple(t.contiguous() for t in field_attention_backward_ref(grad_out, q, k, v, key_padding_mask, lse))


@field_attention_backward.register_fake
def _(grad_out, q, k, v, key_padding_mask, out, lse, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as every implementation


def _field_attention_setup(ctx, inputs, output):
    q, k, v, key_padding_mask, impl = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.impl = impl


def _field_attention_grad(ctx, grad_out, _grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    d_q, d_k, d_v = field_attention_backward(grad_out, q, k, v, key_padding_mask, out, lse, ctx.impl)
    return d_q, d_k, d_v, None, None


field_attention.register_autograd(_field_attention_grad, setup_context=_field_attention_setup)


# ------------------------------------------------ eager Triton path (no custom op)
# The wrappers in msrec_dist.kernels call these in eager mode when Triton runs. A custom op's
# Python dispatch and its registered autograd cost host time that a small batch's kernels do not
# hide: on an H200 at B=16k, gate_combine fwd+bwd 0.48 ms through msrec::gate_combine vs 0.28 ms
# through this Function, field_attention 0.82 vs 0.50 ms (H=2, F=32, dh=16; results under
# benchmarks/results/gpu/). torch.compile and FX still see the custom ops (the wrappers route
# there while compiling), since dynamo traces them through their fakes. Same checks (made by the
# wrappers), same kernels, same results.
class TritonGateCombine(torch.autograd.Function):
    """[B, E, D], [T, B, E] -> [T, B, D] on a non-empty batch, Triton forward and backward."""

    @staticmethod
    def forward(ctx, expert_out, gate_logits, relu=False):
        ctx.save_for_backward(expert_out, gate_logits)
        ctx.relu = relu
        return _gate_combine_forward(expert_out, gate_logits, "triton", relu)

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, gate_logits = ctx.saved_tensors
        return *_gate_combine_backward(grad_out, expert_out, gate_logits, "triton", ctx.relu), None


class TritonFieldAttention(torch.autograd.Function):
    """q, k, v [B, H, F, dh], key_padding_mask [B, F] | None -> out [B, H, F, dh] on a non-empty
    batch; the row log-sum-exp stays in the context for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask):
        out, lse = _field_attention_forward(q, k, v, key_padding_mask, "triton")
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
        d_q, d_k, d_v = _field_attention_backward(grad_out, q, k, v, key_padding_mask, out, lse, "triton")
        return d_q, d_k, d_v, None
