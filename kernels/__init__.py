"""Hot ops of msrec_dist, registered as torch.ops.msrec.* on import.

    gate_combine(expert_out [B, E, D], gate_logits [T, B, E], kernel="auto", relu=False) -> [T, B, D]
        (relu: expert_out holds pre-activations; the experts' ReLU runs inside the op)
    field_attention(q, k, v [B, H, F, dh], key_padding_mask [B, F] | None, kernel="auto")
        -> [B, H, F, dh]  (the op also returns the row log-sum-exp its backward uses; dropped here)

kernel: "auto" (Triton on CUDA; on CPU the C++ kernels where built, else the PyTorch reference)
| "triton" | "cpp" | "reference" (see ops.py).
FX traces and torch.compile graphs show torch.ops.msrec.*; in eager mode the wrappers call the
C++ ops (C++ autograd) or the Triton launchers (an autograd.Function) without the custom op's
Python dispatch, which costs more host time than a small batch's kernels.

Modules: ref_<op>.py (the PyTorch references), triton_<op>.py (the Triton kernels), ops.py
(the custom ops and their routing), native.py (the one loader of the C++ extension
msrec_dist._C), tuning.py (autotuning). Importing this package does not import triton; the
triton_*.py modules load on first use.
"""
from typing import Optional

import torch

from . import ops  # noqa: F401  (registers torch.ops.msrec.*)
from .ref_field_attention import field_attention_ref
from .ref_gate_combine import gate_combine_ref

__all__ = ["gate_combine", "field_attention", "gate_combine_ref", "field_attention_ref", "KERNELS"]
KERNELS = ops.KERNELS


def gate_combine(expert_out: torch.Tensor, gate_logits: torch.Tensor, kernel: str = "auto",
                 relu: bool = False) -> torch.Tensor:
    """Per-task softmax over experts and the weighted sum: [B, E, D], [T, B, E] -> [T, B, D];
    with `relu`, of the ReLU of expert_out (the experts' pre-activations).

    Where the C++ kernel runs, this calls torch.ops.msrec.gate_combine_cpp directly: its autograd
    is registered in C++ (csrc/gate_combine.cpp), which skips the Python custom op's dispatch and
    Python backward (about 0.5 ms per call and backward on this project's 2-core CPU, more than
    the kernel at B=1024). Where Triton runs in eager mode, it calls ops.TritonGateCombine (an
    autograd.Function over the same launchers, without the custom op's host cost; see ops.py).
    Same checks, same kernels, same results as through msrec::gate_combine. FX symbolic tracing
    (Proxy inputs, no device to route on) and torch.compile record msrec::gate_combine.
    """
    chosen = _direct_impl(kernel, "gate_combine", expert_out)
    if chosen is not None:
        ops.check_gate_combine(expert_out, gate_logits)
        if chosen == "cpp":
            return torch.ops.msrec.gate_combine_cpp(expert_out, gate_logits, relu)
        return ops.TritonGateCombine.apply(expert_out, gate_logits, relu)
    return torch.ops.msrec.gate_combine(expert_out, gate_logits, kernel, relu)


def field_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None, kernel: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh)) v over fields: [B, H, F, dh] x3, [B, F] bool -> [B, H, F, dh].

    Where the C++ kernel runs, this calls torch.ops.msrec.field_attention_cpp directly (C++
    autograd, as gate_combine above: the Python custom op's dispatch and backward cost about
    0.14 ms per call on this project's 2-core CPU); where Triton runs in eager mode,
    ops.TritonFieldAttention. Same checks, kernels and results.
    """
    chosen = _direct_impl(kernel, "field_attention", q)
    if chosen is not None:
        ops.check_field_attention(q, k, v, key_padding_mask)
        if chosen == "cpp":
            return torch.ops.msrec.field_attention_cpp(q, k, v, key_padding_mask)[0]
        return ops.TritonFieldAttention.apply(q, k, v, key_padding_mask)
    return torch.ops.msrec.field_attention(q, k, v, key_padding_mask, kernel)[0]


def _direct_impl(kernel: str, op: str, x: torch.Tensor) -> Optional[str]:
    """The implementation the wrapper calls without the Python custom op ("cpp" or "triton"), or
    None where the custom op runs: the reference, an empty batch, FX symbolic tracing (Proxy
    inputs), and Triton while torch.compile traces (it sees the op through its fake; the C++ op
    has fakes of its own)."""
    if isinstance(x, torch.fx.Proxy):
        return None
    chosen = ops.choose_impl(kernel, op, x)
    if chosen == "cpp" or (chosen == "triton" and x.shape[0] > 0 and not torch.compiler.is_compiling()):
        return chosen
    return None
