"""Dense building blocks: a plain MLP and a stack of K independent MLPs run as batched GEMMs.

    MLP            [B, in] → [B, out]                     (Linear + ReLU per hidden layer)
    StackedMLP     [K, B, in] → [K, B, out]   K experts or towers, one `baddbmm` per layer
                   [B, in]    → [K, B, out]   same input for all K: one GEMM over [in, K*out]

Stacking the K weights into one tensor replaces a Python loop of K small GEMMs by one batched
GEMM (the PLE/MMoE experts, the per-task towers).

Both also take the field stack in factored form (FieldParts, msrec_dist/model/fields.py) as the
input of their first layer: it then folds the dense and scenario fields into that layer's weight.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from msrec_dist.model.fields import FieldParts


class MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: list[int], final_activation: bool = True) -> None:
        layers: list[nn.Module] = []
        for i, width in enumerate(hidden):
            layers.append(nn.Linear(in_dim, width))
            if final_activation or i < len(hidden) - 1:
                layers.append(nn.ReLU(inplace=True))  # in place on the Linear output: one tensor fewer
            in_dim = width
        super().__init__(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor | FieldParts) -> torch.Tensor | FieldParts:
        """[B, in] → [B, out]; FieldParts in: the first Linear folds them. No layers: x as is."""
        layers = iter(self)
        if isinstance(x, FieldParts) and len(self) > 0:
            first = next(layers)
            x = x.linear(first.weight.t(), first.bias)  # [B, out]
        for layer in layers:
            x = layer(x)
        return x


class StackedLinear(nn.Module):
    """K independent Linear(in, out) layers held as weight [K, in, out], bias [K, 1, out]."""

    def __init__(self, num: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(num, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num, 1, out_dim).uniform_(-bound, bound))
        self.num, self.in_dim, self.out_dim = num, in_dim, out_dim

    def forward(self, x: torch.Tensor | FieldParts, relu: bool = False) -> torch.Tensor:
        if isinstance(x, FieldParts):  # shared input, as [B, in] below, folded
            y = x.linear(*shared_input_weight(self.weight, self.bias))  # [B, K*out]
            return stacked_output(y, self.num, self.out_dim, relu)  # [K, B, out]
        return stacked_linear(x, self.weight, self.bias, relu)  # [K, B, out]


def shared_input_weight(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [K, in, out], bias [K, 1, out] → one layer over a shared input: [in, K*out], [K*out]."""
    num, in_dim, out_dim = weight.shape
    return weight.permute(1, 0, 2).reshape(in_dim, num * out_dim), bias.reshape(num * out_dim)


def stacked_output(y: torch.Tensor, num: int, out_dim: int, relu: bool) -> torch.Tensor:
    """[B, K*out] of a shared-input layer → [K, B, out] view (ReLU in place first when `relu`)."""
    if relu:
        y = y.relu_()
    return y.view(y.size(0), num, out_dim).transpose(0, 1)


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """x [B, in] (shared) or [K, B, in], weight [K, in, out], bias [K, 1, out] → [K, B, out],
    followed by ReLU when `relu`.

    The bias is the GEMM's accumulator (addmm / baddbmm) and the ReLU runs in place on the GEMM
    output: one [K, B, out] tensor is written instead of three (product, + bias, ReLU), which
    matters on a CPU whose caches do not hold a step's activations. In place is safe: the GEMMs'
    backward needs their inputs, not their output, and ReLU's backward needs only its output.

    It branches on x.dim(), so it is an FX leaf (torch.fx.wrap below): symbolic tracing records
    one call instead of failing on control flow over a traced value.
    """
    if x.dim() == 2:  # shared input [B, in]: one GEMM against [in, K*out]
        w, b = shared_input_weight(weight, bias)  # [in, K*out], [K*out]
        return stacked_output(torch.addmm(b, x, w), weight.size(0), weight.size(2), relu)  # [K, B, out]
    if weight.size(2) == 1:  # one output column (the towers' logit): a dot product per row.
        # MKL's batched GEMM at N = 1 and its backward ran 1.7x slower than this multiply + sum.
        # weight [K, in, 1] read as [K, 1, in] by a view, not a transpose: its gradient then has
        # the weight's own strides (DDP's bucket views expect them, else it copies and warns).
        y = torch.sum(x * weight.view(weight.size(0), 1, weight.size(1)), dim=2, keepdim=True) + bias  # [K, B, 1]
    else:
        y = torch.baddbmm(bias, x, weight)  # [K, B, out]
    return y.relu_() if relu else y


torch.fx.wrap("stacked_linear")


class StackedMLP(nn.Module):
    """K MLPs of equal widths; input [B, in] (shared) or [K, B, in]; output [K, B, hidden[-1]]."""

    def __init__(self, num: int, in_dim: int, hidden: list[int], final_activation: bool = True) -> None:
        super().__init__()
        dims = [in_dim] + list(hidden)
        self.layers = nn.ModuleList(StackedLinear(num, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.final_activation = final_activation
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, relu=self.final_activation or i < len(self.layers) - 1)
        return x
