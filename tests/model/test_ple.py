"""PLE / CGC (msrec_dist/model/ple.py): gate masks, gate softmax, MMoE as the special case,
output shapes [T, B, h], eager vs FX-traced.

Shapes: T = 2 tasks, B = 4, in = 6, h = 5; experts ordered [task 0 ..., task 1 ..., shared ...].
"""
from __future__ import annotations

import torch
from torch.fx import symbolic_trace

from msrec_dist.model.ple import PLE, CGCLevel, expert_groups, gate_mask
from tests.model.conftest import B, T

IN, H = 6, 5
NEG_INF = float("-inf")


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, IN, generator=torch.Generator().manual_seed(seed))


def _gate_probs(level: CGCLevel, x: torch.Tensor) -> torch.Tensor:
    """softmax(logits + mask) over experts, [G, B, E], as the level computes it (first level)."""
    return torch.softmax(level.gates(x) + level.mask, dim=-1)


def test_expert_groups_and_gate_mask():
    groups = expert_groups(num_tasks=2, task_experts=1, shared_experts=2)
    assert groups == [0, 1, 2, 2]
    mask = gate_mask(2, groups, with_shared_gate=True)
    expected = torch.tensor([[0.0, NEG_INF, 0.0, 0.0],   # task 0: own + shared
                             [NEG_INF, 0.0, 0.0, 0.0],   # task 1: own + shared
                             [0.0, 0.0, 0.0, 0.0]])      # shared gate: all
    torch.testing.assert_close(mask, expected, rtol=0, atol=0)
    assert gate_mask(2, groups, with_shared_gate=False).shape == (2, 4)


def test_gates_sum_to_one_and_are_zero_on_masked_experts():
    torch.manual_seed(0)
    level = CGCLevel(IN, H, num_tasks=T, task_experts=2, shared_experts=1, last=False, kernel="reference")
    probs = _gate_probs(level, _x())  # [G=3, B, E=5]; experts [t0, t0, t1, t1, shared]
    assert probs.shape == (T + 1, B, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(T + 1, B))
    assert (probs[0, :, 2:4] == 0).all() and (probs[0, :, [0, 1, 4]] > 0).all()
    assert (probs[1, :, 0:2] == 0).all() and (probs[1, :, 2:5] > 0).all()
    assert (probs[2] > 0).all()  # the shared gate sees every expert


def test_level_output_is_gate_weighted_sum_of_experts():
    torch.manual_seed(1)
    level = CGCLevel(IN, H, num_tasks=T, task_experts=1, shared_experts=2, last=False, kernel="reference")
    x = _x(1)
    out = level(x)
    assert out.shape == (T + 1, B, H)
    expected = torch.einsum("gbe,ebh->gbh", _gate_probs(level, x), level.experts(x))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_task_gate_ignores_other_tasks_experts():
    torch.manual_seed(2)
    level = CGCLevel(IN, H, num_tasks=T, task_experts=1, shared_experts=1, last=True, kernel="reference")
    x = _x(2)
    out = level(x)  # [T, B, h]; experts [t0, t1, shared]
    with torch.no_grad():  # change task 1's expert only
        for layer in level.experts.layers:
            layer.weight[1].normal_()
            layer.bias[1].normal_()
    out2 = level(x)
    torch.testing.assert_close(out2[0], out[0], rtol=0, atol=0)
    assert not torch.allclose(out2[1], out[1], atol=1e-4)


def test_second_level_feeds_experts_from_their_group():
    torch.manual_seed(3)
    level = CGCLevel(H, H, num_tasks=T, task_experts=1, shared_experts=2, last=True, kernel="reference")
    groups_in = torch.randn(T + 1, B, H)  # [task 0, task 1, shared] outputs of the level below
    out = level(groups_in)
    assert out.shape == (T, B, H)
    expert_out = level.experts(groups_in[[0, 1, 2, 2]])  # experts [t0, t1, shared, shared]
    probs = torch.softmax(level.gates(groups_in[:T]) + level.mask, dim=-1)  # task gate t sees group t
    torch.testing.assert_close(out, torch.einsum("gbe,ebh->gbh", probs, expert_out), rtol=1e-5, atol=1e-6)


def test_mmoe_special_case_every_gate_sees_every_shared_expert():
    torch.manual_seed(4)
    mmoe = PLE(IN, H, num_tasks=T, levels=1, task_experts=0, shared_experts=3, kernel="reference")
    (level,) = mmoe.levels
    assert level.num_experts == 3 and level.mask.shape == (T, 1, 3)
    assert (level.mask == 0).all()
    x = _x(4)
    probs = _gate_probs(level, x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(T, B))
    assert (probs > 0).all()
    out = mmoe(x)
    assert out.shape == (T, B, H)
    torch.testing.assert_close(out, torch.einsum("tbe,ebh->tbh", probs, level.experts(x)), rtol=1e-5, atol=1e-6)


def test_ple_output_shape_eager_and_fx_traced():
    torch.manual_seed(5)
    ple = PLE(IN, H, num_tasks=T, levels=3, task_experts=1, shared_experts=2, kernel="reference")
    x = _x(5)
    out = ple(x)
    assert out.shape == (T, B, H)
    assert ple.levels[0](x).shape == (T + 1, B, H)  # inner levels keep the shared group
    traced = symbolic_trace(ple)
    torch.testing.assert_close(traced(x), out, rtol=0, atol=0)
    # the traced graph calls the registered op, so torch.compile / pipelines see it
    assert any(n.op == "call_function" and "gate_combine" in str(n.target) for n in traced.graph.nodes)


def test_scenario_gates_add_the_rows_scenario_bias_only():
    torch.manual_seed(5)
    S = 3
    level = CGCLevel(IN, H, num_tasks=T, task_experts=1, shared_experts=2, last=False, kernel="reference",
                     num_scenarios=S)
    x = _x(5)
    scenario = torch.tensor([0, 2, 1, 2])
    onehot = torch.nn.functional.one_hot(scenario, S).float()  # [B, S]
    plain = torch.einsum("gbe,ebh->gbh", _gate_probs(level, x), level.experts(x))
    torch.testing.assert_close(level(x, onehot), plain, rtol=1e-5, atol=1e-6)  # zero init: no effect
    with torch.no_grad():
        level.scenario_gate_bias[:, 2, 0] = 3.0  # scenario 2 favours expert 0 (task 0's own)
    out = level(x, onehot)
    rows2 = scenario == 2
    torch.testing.assert_close(out[:, ~rows2], plain[:, ~rows2], rtol=1e-5, atol=1e-6)  # other rows unchanged
    bias = torch.zeros(T + 1, B, 4)
    bias[:, rows2, 0] = 3.0
    probs = torch.softmax(level.gates(x) + bias + level.mask, dim=-1)  # [G, B, E]
    torch.testing.assert_close(out, torch.einsum("gbe,ebh->gbh", probs, level.experts(x)), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert level.scenario_gate_bias.grad is not None and level.scenario_gate_bias.grad.abs().sum() > 0


def test_ple_with_scenario_gates_fx_traces():
    S = 3
    ple = PLE(IN, H, num_tasks=T, levels=2, task_experts=1, shared_experts=2, kernel="reference", num_scenarios=S)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), S).float()
    traced = symbolic_trace(ple)
    torch.testing.assert_close(traced(_x(), onehot), ple(_x(), onehot), rtol=0, atol=0)


def test_first_level_runs_experts_and_gates_as_one_gemm_with_the_same_result():
    """shared_input (PLE's first level): the experts' first layer and the gates are one GEMM
    against their concatenated weights; same outputs and gradients as two stacked GEMMs."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(6)
    fused = CGCLevel(IN, H, num_tasks=T, task_experts=1, shared_experts=2, last=False, kernel="reference",
                     shared_input=True)
    plain = copy.deepcopy(fused)
    plain.shared_input = False
    x = _x(6).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fused(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("aten::addmm") == 1 and "aten::baddbmm" not in calls  # one GEMM for experts + gates
    expected = plain(x2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert PLE(IN, H, num_tasks=T, levels=2, task_experts=1, shared_experts=2, kernel="reference").levels[0].shared_input
