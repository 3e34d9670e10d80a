"""Multi-head self-attention over feature fields (AutoInt), with a residual projection.

    fields [B, F, D] ──fused QKV Linear──► [B, F, 3, H, dh] ──► q, k, v [B, H, F, dh]
         ──torch.ops.msrec.field_attention──► [B, H, F, dh] ──► [B, F, H*dh]
         + residual Linear(D, H*dh) ──ReLU──► [B, F, H*dh]

The attention itself is the `field_attention` op (PyTorch reference on CPU, Triton on CUDA).
"""
from __future__ import annotations

import torch
from torch import nn

from msrec_dist.kernels import field_attention


class FieldSelfAttentionLayer(nn.Module):
    def __init__(self, in_dim: int, heads: int, head_dim: int, kernel: str) -> None:
        super().__init__()
        self.heads, self.head_dim, self.kernel = heads, head_dim, kernel
        self.qkv = nn.Linear(in_dim, 3 * heads * head_dim, bias=False)
        self.residual = nn.Linear(in_dim, heads * head_dim, bias=False)
        self.out_dim = heads * head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, num_fields = x.size(0), x.size(1)
        qkv = self.qkv(x).view(batch_size, num_fields, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, F, dh]
        # views of the fused projection, no copies: the C++ kernel reads them through their strides
        # (msrec_full's exported program spent a quarter of its time in copies), Triton copies itself
        out = field_attention(q, k, v, None, self.kernel)  # [B, H, F, dh]
        out = out.transpose(1, 2).reshape(batch_size, num_fields, self.out_dim)  # [B, F, H*dh]
        return (out + self.residual(x)).relu_()  # in place on a fresh sum


class FieldSelfAttention(nn.Sequential):
    def __init__(self, in_dim: int, heads: int, head_dim: int, layers: int, kernel: str) -> None:
        blocks = []
        for _ in range(layers):
            blocks.append(FieldSelfAttentionLayer(in_dim, heads, head_dim, kernel))
            in_dim = heads * head_dim
        super().__init__(*blocks)
        self.out_dim = in_dim
