"""STAR block (msrec_dist/model/star.py): star-topology FC, partitioned normalization,
per-scenario moments, the trunk eager vs FX-traced, the auxiliary net's shape."""
from __future__ import annotations

import pytest
import torch
from torch.fx import symbolic_trace

from msrec_dist.model.star import (AuxiliaryNet, PartitionedNorm, StarLinear, StarTrunk, scenario_moments,
                                   scenario_onehot, star_weight)
from tests.model.conftest import S, T

# 7 rows, scenario 0: rows 0, 2, 5; scenario 1: rows 1, 3, 6; scenario 2: row 4
SCEN7 = torch.tensor([0, 1, 0, 1, 2, 0, 1])


def _onehot(scenario: torch.Tensor) -> torch.Tensor:
    return scenario_onehot(scenario, S, torch.float32)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_star_weight_is_shared_times_scenario():
    g = torch.Generator().manual_seed(1)
    shared, scen = torch.randn(5, 3, generator=g), torch.randn(S, 5, 3, generator=g)
    w = star_weight(shared, scen)
    assert w.shape == (S, 5, 3)
    for s in range(S):
        torch.testing.assert_close(w[s], shared * scen[s], rtol=0, atol=0)


def test_star_linear_row_uses_its_scenario_weight():
    layer = StarLinear(5, 3, S)
    _randomise(layer, seed=2)  # scenario weights/biases away from their ones/zeros init
    scenario = torch.tensor([0, 1, 2, 0])
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    y = layer(x, _onehot(scenario))
    assert y.shape == (4, 3)
    for b, s in enumerate(scenario.tolist()):
        w = layer.shared_weight * layer.scenario_weight[s]  # [in, out]
        expected = x[b] @ w + layer.shared_bias + layer.scenario_bias[s]
        torch.testing.assert_close(y[b], expected, rtol=1e-5, atol=1e-6)
    # and not the weight of another scenario (the check above could not pass by accident)
    other = x[1] @ (layer.shared_weight * layer.scenario_weight[0]) + layer.shared_bias + layer.scenario_bias[0]
    assert not torch.allclose(y[1], other, atol=1e-3)


def test_scenario_moments_match_manual_per_scenario_stats():
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(4))
    scenario = torch.tensor([0, 1, 0, 1, 0, 0, 1])  # scenario 2 has no rows
    mean, var, count = scenario_moments(x, _onehot(scenario))
    torch.testing.assert_close(count, torch.tensor([4.0, 3.0, 0.0]))
    for s in range(2):
        rows = x[scenario == s]
        torch.testing.assert_close(mean[s], rows.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var[s], rows.var(0, unbiased=False), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean[2], torch.zeros(3), rtol=0, atol=0)
    torch.testing.assert_close(var[2], torch.zeros(3), rtol=0, atol=0)


def test_synced_moments_one_all_reduce_match_two_pass():
    """The synced path (one sum over ranks of count, Σ(x−K), Σ(x−K)²; here the sum over one rank,
    i.e. identity) gives the two-pass statistics and gradients, also for data far from 0 when the
    shift K is near the mean; with K = 0 that data shows the cancellation the shift avoids."""
    import msrec_dist.model.star as star

    calls = []

    def rank_sum(t):
        calls.append(t.shape)
        return t

    gen = torch.Generator().manual_seed(8)
    scenario = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1])
    onehot = _onehot(scenario)
    for offset in (0.0, 1000.0):
        x = (torch.randn(8, 3, generator=gen) + offset).requires_grad_()
        shift = torch.stack([x[scenario == s].mean(0) for s in range(2)] + [torch.zeros(3)]).detach() + 0.3
        upstream = [torch.randn(3, 3, generator=gen) for _ in range(2)]
        got = star.scenario_moments(x, onehot, rank_sum, shift=shift)
        (gx,) = torch.autograd.grad(got[0] * upstream[0] + got[1] * upstream[1], x, torch.ones(3, 3).expand(3, 3))
        x2 = x.detach().clone().requires_grad_()
        want = star.scenario_moments(x2, onehot)
        (wx,) = torch.autograd.grad(want[0] * upstream[0] + want[1] * upstream[1], x2, torch.ones(3, 3).expand(3, 3))
        for s in range(2):
            torch.testing.assert_close(got[0][s], want[0][s], rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(got[1][s], want[1][s], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[2], want[2])
        torch.testing.assert_close(gx, wx, rtol=1e-4, atol=1e-4)
    assert calls == [(3, 7), (3, 7)]  # one sum over ranks per call: [S, 1 + 2N]
    x = torch.randn(8, 3, generator=gen) + 1000.0
    unshifted = star.scenario_moments(x, onehot, rank_sum)[1][:2]
    exact = star.scenario_moments(x, onehot)[1][:2]
    assert (unshifted - exact).abs().max() > 1e-2  # fp32 cancellation without the shift


def test_partitioned_norm_train_normalises_with_own_scenario_stats():
    norm = PartitionedNorm(3, S).train()
    _randomise(norm, seed=5)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(6)) * 3 + 1
    y = norm(x, _onehot(SCEN7))
    for b, s in enumerate(SCEN7.tolist()):
        rows = x[SCEN7 == s]
        mean, var = rows.mean(0), rows.var(0, unbiased=False)
        gamma = norm.shared_gamma * norm.scenario_gamma[s]
        beta = norm.shared_beta + norm.scenario_beta[s]
        torch.testing.assert_close(y[b], (x[b] - mean) / torch.sqrt(var + norm.eps) * gamma + beta,
                                   rtol=1e-4, atol=1e-5)


def test_partitioned_norm_rows_of_other_scenarios_do_not_leak():
    norm = PartitionedNorm(3, S).train()
    _randomise(norm, seed=7)
    onehot = _onehot(SCEN7)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(8))
    x2 = x.clone()
    x2[SCEN7 == 1] = torch.randn(3, 3, generator=torch.Generator().manual_seed(9)) * 5 - 2
    y, y2 = norm(x, onehot), norm(x2, onehot)
    keep = SCEN7 != 1
    torch.testing.assert_close(y2[keep], y[keep], rtol=0, atol=1e-6)
    assert not torch.allclose(y2[~keep], y[~keep], atol=1e-3)


def test_partitioned_norm_running_stats_update_only_present_scenarios():
    norm = PartitionedNorm(3, S, momentum=0.1).train()
    g = torch.Generator().manual_seed(10)
    norm.running_mean.copy_(torch.randn(S, 3, generator=g))
    norm.running_var.copy_(torch.rand(S, 3, generator=g) + 0.5)
    before_mean, before_var = norm.running_mean.clone(), norm.running_var.clone()
    scenario = torch.tensor([0, 0, 1, 1, 0])  # scenario 2 absent
    x = torch.randn(5, 3, generator=g, requires_grad=True)
    norm(x, _onehot(scenario)).sum().backward()
    torch.testing.assert_close(norm.running_mean[2], before_mean[2], rtol=0, atol=0)
    torch.testing.assert_close(norm.running_var[2], before_var[2], rtol=0, atol=0)
    for s in (0, 1):
        rows = x.detach()[scenario == s]
        torch.testing.assert_close(norm.running_mean[s], 0.9 * before_mean[s] + 0.1 * rows.mean(0))
        torch.testing.assert_close(norm.running_var[s], 0.9 * before_var[s] + 0.1 * rows.var(0, unbiased=False))
    assert not norm.running_mean.requires_grad and not norm.running_var.requires_grad


def test_partitioned_norm_eval_uses_running_stats_and_keeps_them():
    norm = PartitionedNorm(3, S)
    _randomise(norm, seed=11)
    g = torch.Generator().manual_seed(12)
    norm.running_mean.copy_(torch.randn(S, 3, generator=g))
    norm.running_var.copy_(torch.rand(S, 3, generator=g) + 0.5)
    before = norm.running_mean.clone(), norm.running_var.clone()
    norm.eval()
    x = torch.randn(7, 3, generator=g)
    y = norm(x, _onehot(SCEN7))
    for b, s in enumerate(SCEN7.tolist()):
        gamma = norm.shared_gamma * norm.scenario_gamma[s]
        beta = norm.shared_beta + norm.scenario_beta[s]
        expected = (x[b] - norm.running_mean[s]) / torch.sqrt(norm.running_var[s] + norm.eps) * gamma + beta
        torch.testing.assert_close(y[b], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.running_mean, before[0], rtol=0, atol=0)
    torch.testing.assert_close(norm.running_var, before[1], rtol=0, atol=0)


def test_star_trunk_shape_eager_and_fx_traced():
    scenario = torch.tensor([0, 1, 2, 0])
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(13)).requires_grad_()
    for training in (True, False):
        torch.manual_seed(0)
        trunk = StarTrunk(6, [8, 5], S, partitioned_norm=True, momentum=0.1).train(training)
        _randomise(trunk.layers, seed=14)
        traced = symbolic_trace(trunk)  # traces the current train/eval branch
        y = trunk(x, _onehot(scenario))
        assert y.shape == (4, 5)
        torch.testing.assert_close(traced(x, _onehot(scenario)), y, rtol=0, atol=0)
        # the traced code drops `with torch.no_grad()`: the running stats must still stay out of autograd
        assert not trunk.norm.running_mean.requires_grad and not trunk.norm.running_var.requires_grad


class _TwoRanks:
    """Stands in for the sum over two ranks whose other rank holds the same values: forward and
    backward double (the backward of a sum over ranks sums the gradients over ranks too)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return t * 2.0


def test_star_trunk_with_a_rank_sum_fx_traces_to_a_call_of_it():
    """The sum over ranks handed to the model: the norm's statistics are those of the global batch
    (here two ranks of the same rows: the same as one rank's), and an FX trace keeps one leaf call
    of it (not a trace through the collective) that runs the held sum."""
    from msrec_dist.model.star import sum_over_ranks

    scenario = torch.tensor([0, 1, 2, 0, 1])
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(15)).requires_grad_()
    rank_sum = _TwoRanks()
    torch.manual_seed(0)
    synced = StarTrunk(6, [8, 5], S, partitioned_norm=True, momentum=0.1, rank_sum=rank_sum).train()
    torch.manual_seed(0)
    alone = StarTrunk(6, [8, 5], S, partitioned_norm=True, momentum=0.1).train()
    traced = symbolic_trace(synced)
    calls = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is sum_over_ranks]
    assert len(calls) == 1
    y = synced(x, _onehot(scenario))
    assert rank_sum.calls == 1
    torch.testing.assert_close(y, alone(x, _onehot(scenario)), rtol=1e-5, atol=1e-5)
    # the eager call moved the running mean, the shift of the next statistics: equal up to float order
    torch.testing.assert_close(traced(x, _onehot(scenario)), y, rtol=1e-5, atol=1e-5)
    assert rank_sum.calls == 2


def test_auxiliary_net_gives_one_offset_per_task():
    aux = AuxiliaryNet(S, emb_dim=3, field_dim=4, hidden=[5], num_tasks=T)
    out = aux(torch.tensor([0, 1, 2, 0]), torch.randn(4, 6, 4))
    assert out.shape == (4, T)


def test_auxiliary_net_concat_input_sees_every_field():
    aux = AuxiliaryNet(S, emb_dim=3, field_dim=4, hidden=[5], num_tasks=T, num_fields=6, concat=True)
    fields = torch.randn(4, 6, 4)
    out = aux(torch.tensor([0, 1, 2, 0]), fields)
    assert out.shape == (4, T)
    assert aux.mlp[0].in_features == 3 + 6 * 4
    # swapping two fields changes a concat input (a mean input would not see it)
    swapped = fields[:, [1, 0, 2, 3, 4, 5]]
    assert not torch.allclose(aux(torch.tensor([0, 1, 2, 0]), swapped), out)
    mean_aux = AuxiliaryNet(S, emb_dim=3, field_dim=4, hidden=[5], num_tasks=T)
    torch.testing.assert_close(mean_aux(torch.tensor([0, 1, 2, 0]), swapped),
                               mean_aux(torch.tensor([0, 1, 2, 0]), fields))


@pytest.mark.parametrize("partitioned_norm", [True, False])
def test_grouped_eval_equals_the_masked_form(partitioned_norm):
    """group_by_scenario (the serving export's form): each row through its own scenario's weights
    gives the masked form's values, a scenario without rows and a batch of one included."""
    torch.manual_seed(0)
    trunk = StarTrunk(12, [10, 6], 3, partitioned_norm, 0.1)
    with torch.no_grad():
        for layer in trunk.layers:
            layer.scenario_weight.normal_(1.0, 0.3)
            layer.scenario_bias.normal_()
        if partitioned_norm:
            trunk.norm.running_mean.normal_()
            trunk.norm.running_var.uniform_(0.5, 2.0)
            trunk.norm.scenario_gamma.normal_(1.0, 0.2)
    trunk.eval()
    for scenario in (torch.tensor([2, 0, 2, 1, 0, 2, 2]), torch.tensor([1, 1, 1]), torch.tensor([2])):
        x = torch.randn(len(scenario), 12)
        onehot = scenario_onehot(scenario, 3, torch.float32)
        masked = trunk(x, onehot)
        trunk.group_by_scenario = True
        grouped = trunk(x, onehot)
        trunk.group_by_scenario = False
        torch.testing.assert_close(grouped, masked, rtol=1e-6, atol=1e-6)
    if partitioned_norm:  # training keeps the masked form: batch statistics, not the running ones
        trunk.train()
        x = torch.randn(7, 12) * 3 + 1
        onehot = scenario_onehot(torch.tensor([2, 0, 2, 1, 0, 2, 2]), 3, torch.float32)
        masked = trunk(x, onehot)
        trunk.group_by_scenario = True
        torch.testing.assert_close(trunk(x, onehot), masked, rtol=0, atol=0)
        trunk.eval()
        assert not torch.allclose(trunk(x, onehot), masked, atol=1e-3)  # eval's statistics do differ
