"""Balanced scenario/task expert mixing.

    scenario experts  S MLPs on the trunk output → [S, B, h]
    task experts      T MLPs on the trunk output → [T, B, h]
    for scenario d:   α_d = σ(θ_d); mix_d = α_d · own expert + (1 − α_d) · mean of the other S−1
    for task t:       β_t = σ(φ_t); the same over task experts
    out_t = w_s[t] · scenario mix of the row's scenario + w_t[t] · task mix of t      → [T, B, h]

The output is added to the PLE mix before the towers (zoo.py).
"""
from __future__ import annotations

import torch
from torch import nn

from msrec_dist.model.mlp import StackedMLP


def balanced_mixing_matrix(theta: torch.Tensor) -> torch.Tensor:
    """θ [K] → M [K, K]: M[d, d] = σ(θ_d), M[d, j≠d] = (1 − σ(θ_d)) / (K − 1); K = 1 → [[1]]."""
    k = theta.size(0)
    if k == 1:
        return torch.ones(1, 1, dtype=theta.dtype, device=theta.device)
    alpha = torch.sigmoid(theta).unsqueeze(1)  # [K, 1]
    eye = torch.eye(k, dtype=theta.dtype, device=theta.device)
    return eye * alpha + (1 - eye) * (1 - alpha) / (k - 1)


torch.fx.wrap("balanced_mixing_matrix")  # an FX leaf: it branches on theta's size


class BalancedMixing(nn.Module):
    def __init__(self, in_dim: int, hidden: int, num_scenarios: int, num_tasks: int,
                 own_weight_init: float = 0.5, scale_init: float = 0.5) -> None:
        super().__init__()
        theta0 = torch.logit(torch.tensor(own_weight_init)).item()  # σ(θ0) = own_weight_init
        self.scenario_experts = StackedMLP(num_scenarios, in_dim, [hidden])
        self.task_experts = StackedMLP(num_tasks, in_dim, [hidden])
        self.scenario_theta = nn.Parameter(torch.full((num_scenarios,), theta0))
        self.task_theta = nn.Parameter(torch.full((num_tasks,), theta0))
        self.scenario_scale = nn.Parameter(torch.full((num_tasks, 1, 1), scale_init))
        self.task_scale = nn.Parameter(torch.full((num_tasks, 1, 1), scale_init))
        self.out_dim = hidden

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        scen = self.scenario_experts(x)  # [S, B, h]
        row_weights = onehot @ balanced_mixing_matrix(self.scenario_theta)  # [B, S]
        scen_mix = torch.einsum("bs,sbh->bh", row_weights, scen)  # [B, h]
        tasks = self.task_experts(x)  # [T, B, h]
        task_mix = torch.einsum("tu,ubh->tbh", balanced_mixing_matrix(self.task_theta), tasks)  # [T, B, h]
        return self.scenario_scale * scen_mix.unsqueeze(0) + self.task_scale * task_mix  # [T, B, h]
