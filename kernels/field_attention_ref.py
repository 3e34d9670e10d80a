"""PyTorch reference for field_attention: softmax(q k^T / sqrt(dh)) v over the F feature fields.

    q, k, v          [B, H, F, dh]
    key_padding_mask [B, F] bool, True = padded field (ignored as a key), optional
    out              [B, H, F, dh]

Math runs in fp32 (fp64 for fp64 inputs). A query whose keys are all padded gets a zero
output and zero gradients (no NaN), the convention the Triton kernel follows too.
"""
from typing import Optional, Tuple

import torch

from .gate_combine_ref import acc_dtype


def _probs(q, k, key_padding_mask):
    """Attention probabilities P [B, H, F, F] in the accumulation dtype."""
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5  # [B, H, F, F]
    if key_padding_mask is None:
        return torch.softmax(scores, dim=-1)
    all_padded = key_padding_mask.all(dim=-1)                            # [B]
    masked = key_padding_mask & ~all_padded[:, None]                     # keep rows finite
    probs = torch.softmax(scores.masked_fill(masked[:, None, None, :], float("-inf")), dim=-1)
    return probs * (~all_padded).to(probs.dtype)[:, None, None, None]


def field_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    acc = acc_dtype(q.dtype)
    probs = _probs(q.to(acc), k.to(acc), key_padding_mask)               # [B, H, F, F]
    return torch.einsum("bhij,bhjd->bhid", probs, v.to(acc)).to(q.dtype)


def field_attention_backward_ref(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each [B, H, F, dh], recomputing P from q and k."""
    acc = acc_dtype(q.dtype)
    q32, k32, v32, do = q.to(acc), k.to(acc), v.to(acc), grad_out.to(acc)
    scale = q.shape[-1] ** -0.5
    probs = _probs(q32, k32, key_padding_mask)                           # [B, H, F, F]
    d_v = torch.einsum("bhij,bhid->bhjd", probs, do)                     # P^T dO
    d_p = torch.einsum("bhid,bhjd->bhij", do, v32)                       # dO V^T
    d_s = probs * (d_p - (probs * d_p).sum(dim=-1, keepdim=True))        # softmax backward
    d_q = torch.einsum("bhij,bhjd->bhid", d_s, k32) * scale
    d_k = torch.einsum("bhij,bhid->bhjd", d_s, q32) * scale
    return d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype)
