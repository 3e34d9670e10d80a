"""Balanced scenario/task mixing (msrec_dist/model/mixing.py): the mixing matrix on hand-made
θ, the block's output on a hand-computed case, eager vs FX-traced."""
from __future__ import annotations

import math

import torch
from torch.fx import symbolic_trace

from msrec_dist.model.mixing import BalancedMixing, balanced_mixing_matrix

LOG3 = math.log(3.0)


def test_mixing_matrix_hand_made():
    m = balanced_mixing_matrix(torch.tensor([0.0, LOG3, -LOG3]))
    # σ(0) = 1/2, σ(log 3) = 3/4, σ(-log 3) = 1/4; off-diagonal (1 − σ) / (K − 1)
    expected = torch.tensor([[0.5, 0.25, 0.25],
                             [0.125, 0.75, 0.125],
                             [0.375, 0.375, 0.25]])
    torch.testing.assert_close(m, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.sum(1), torch.ones(3))


def test_mixing_matrix_single_scenario_is_identity():
    m = balanced_mixing_matrix(torch.tensor([2.5]))
    torch.testing.assert_close(m, torch.ones(1, 1), rtol=0, atol=0)


def test_mixing_matrix_gradient_flows_to_theta():
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    (balanced_mixing_matrix(theta) * torch.tensor([[1.0, 2.0], [3.0, 5.0]])).sum().backward()
    # d/dθ_d [σ_d · a_dd + (1 − σ_d) · a_dj] = σ'(θ_d) · (a_dd − a_dj)
    s = torch.sigmoid(theta.detach())
    torch.testing.assert_close(theta.grad, s * (1 - s) * torch.tensor([1.0 - 2.0, 5.0 - 3.0]))


def _hand_made_mixing() -> BalancedMixing:
    """S = 3, T = 2, h = 1; experts output their bias only (zero weights, bias > 0 through ReLU)."""
    mix = BalancedMixing(in_dim=2, hidden=1, num_scenarios=3, num_tasks=2)
    with torch.no_grad():
        for p in mix.parameters():
            p.zero_()
        mix.scenario_experts.layers[0].bias.copy_(torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1))
        mix.task_experts.layers[0].bias.copy_(torch.tensor([8.0, 16.0]).view(2, 1, 1))
        mix.scenario_theta.copy_(torch.tensor([0.0, LOG3, -LOG3]))
        mix.task_theta.copy_(torch.tensor([LOG3, 0.0]))
        mix.scenario_scale.copy_(torch.tensor([1.0, 0.5]).view(2, 1, 1))
        mix.task_scale.copy_(torch.tensor([0.5, 2.0]).view(2, 1, 1))
    return mix


def test_balanced_mixing_hand_computed():
    mix = _hand_made_mixing()
    onehot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # rows of scenario 0 and 2
    out = mix(torch.randn(2, 2), onehot)
    # scenario mix: row 0 → .5·1 + .25·2 + .25·4 = 2;  row 2 → .375·1 + .375·2 + .25·4 = 2.125
    # task mix:     t0 → .75·8 + .25·16 = 10;          t1 → .5·8 + .5·16 = 12
    # out[t, b] = scenario_scale[t] · scen[b] + task_scale[t] · task[t]
    expected = torch.tensor([[[1 * 2 + 0.5 * 10], [1 * 2.125 + 0.5 * 10]],
                             [[0.5 * 2 + 2 * 12], [0.5 * 2.125 + 2 * 12]]])
    assert out.shape == (2, 2, 1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_balanced_mixing_matches_docstring_formula_and_fx_trace():
    torch.manual_seed(0)
    mix = BalancedMixing(in_dim=6, hidden=5, num_scenarios=3, num_tasks=2)
    with torch.no_grad():
        for p in (mix.scenario_theta, mix.task_theta, mix.scenario_scale, mix.task_scale):
            p.normal_()
    x = torch.randn(4, 6)
    scenario = torch.tensor([0, 1, 2, 0])
    onehot = torch.nn.functional.one_hot(scenario, 3).float()
    out = mix(x, onehot)
    scen, tasks = mix.scenario_experts(x), mix.task_experts(x)  # [S, B, h], [T, B, h]
    for t in range(2):
        beta = torch.sigmoid(mix.task_theta[t])
        task_mix = beta * tasks[t] + (1 - beta) * tasks[1 - t]  # mean of the other T − 1 = 1
        for b, d in enumerate(scenario.tolist()):
            alpha = torch.sigmoid(mix.scenario_theta[d])
            others = [j for j in range(3) if j != d]
            scen_mix = alpha * scen[d, b] + (1 - alpha) * scen[others, b].mean(0)
            expected = mix.scenario_scale[t, 0] * scen_mix + mix.task_scale[t, 0] * task_mix[b]
            torch.testing.assert_close(out[t, b], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(symbolic_trace(mix)(x, onehot), out, rtol=0, atol=0)


def test_own_weight_init_sets_initial_alpha():
    mix = BalancedMixing(in_dim=2, hidden=1, num_scenarios=3, num_tasks=2, own_weight_init=0.9, scale_init=0.25)
    torch.testing.assert_close(torch.sigmoid(mix.scenario_theta.detach()), torch.full((3,), 0.9))
    torch.testing.assert_close(torch.sigmoid(mix.task_theta.detach()), torch.full((2,), 0.9))
    m = balanced_mixing_matrix(mix.scenario_theta.detach())
    torch.testing.assert_close(m, torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]))
    assert (mix.scenario_scale == 0.25).all() and (mix.task_scale == 0.25).all()
