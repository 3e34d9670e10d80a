"""Stacked layers (msrec_dist/model/mlp.py): K MLPs run as batched GEMMs equal K separate MLPs,
forward and gradients, for a shared [B, in] input and per-MLP [K, B, in] inputs, with the
one-column last layer (the towers' logit, a multiply + sum instead of a GEMM) and a wider one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from msrec_dist.model.mlp import StackedMLP


def _separate(stacked: StackedMLP, k: int) -> nn.Sequential:
    """MLP k of the stack as nn.Linear layers sharing nothing with it (copied weights)."""
    layers: list[nn.Module] = []
    n = len(stacked.layers)
    for i, layer in enumerate(stacked.layers):
        lin = nn.Linear(layer.in_dim, layer.out_dim)
        with torch.no_grad():
            lin.weight.copy_(layer.weight[k].t())
            lin.bias.copy_(layer.bias[k, 0])
        layers.append(lin)
        if stacked.final_activation or i < n - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("hidden,final_activation", [([8, 1], False), ([8, 5], True), ([1], False)])
@pytest.mark.parametrize("shared_input", [True, False])
def test_stacked_mlp_equals_separate_mlps(hidden, final_activation, shared_input):
    torch.manual_seed(0)
    K, B, IN = 3, 17, 6
    stacked = StackedMLP(K, IN, hidden, final_activation=final_activation)
    separate = [_separate(stacked, k) for k in range(K)]
    x = torch.randn(B, IN) if shared_input else torch.randn(K, B, IN)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = stacked(xs)  # [K, B, out]
    want = torch.stack([m(xr if shared_input else xr[k]) for k, m in enumerate(separate)])
    assert out.shape == (K, B, hidden[-1])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for i, layer in enumerate(stacked.layers):
        lin = [[mod for mod in m if isinstance(mod, nn.Linear)][i] for m in separate]
        torch.testing.assert_close(layer.weight.grad, torch.stack([m.weight.grad.t() for m in lin]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.bias.grad, torch.stack([m.bias.grad.unsqueeze(0) for m in lin]),
                                   rtol=1e-5, atol=1e-5)
