"""PLE: progressive layered extraction with stacked CGC levels (Tang et al., RecSys 2020).

    level inputs  [G, B, in], G = T task groups + 1 shared group (level 0: one shared [B, in])
    experts       E = T * task_experts + shared_experts, stacked: one batched GEMM → [E, B, h]
                  pre-activations; their ReLU runs inside gate_combine (relu=True)
    gates         one Linear per group → logits [G, B, E]; a task gate sees only its own task
                  experts and the shared experts (others masked to -inf), the shared gate all;
                  with scenario_gates, + a learned per-scenario logit bias [G, S, E] picked by the
                  row's scenario (one-hot [B, S]), so each scenario can weigh the experts its own way
    combine       msrec_dist.kernels.gate_combine(experts [B, E, h], logits [G, B, E], relu=True) → [G, B, h]
    last level    has no shared gate: output [T, B, h]

The first level's experts and gates read one shared input ([B, in], or the field stack folded:
FieldParts), so their first layers run as one GEMM against [in, E*h + G*E] (shared_input_layers).

MMoE is the special case levels=1, task_experts=0 (every gate sees every shared expert).
"""
from __future__ import annotations

import torch
from torch import nn

from msrec_dist.kernels import gate_combine
from msrec_dist.model.fields import FieldParts
from msrec_dist.model.mlp import StackedLinear, StackedMLP, shared_input_weight, stacked_output


def expert_groups(num_tasks: int, task_experts: int, shared_experts: int) -> list[int]:
    """Group index of each expert: task experts of task t → t, shared experts → num_tasks."""
    return [t for t in range(num_tasks) for _ in range(task_experts)] + [num_tasks] * shared_experts


def gate_mask(num_tasks: int, groups: list[int], with_shared_gate: bool) -> torch.Tensor:
    """[G, E] additive mask: 0 where gate g may use expert e, -inf elsewhere."""
    num_gates = num_tasks + (1 if with_shared_gate else 0)
    mask = torch.full((num_gates, len(groups)), float("-inf"))
    for g in range(num_gates):
        for e, owner in enumerate(groups):
            if g == num_tasks or owner == g or owner == num_tasks:
                mask[g, e] = 0.0
    return mask


def level_inputs(x: torch.Tensor, expert_group: torch.Tensor, num_gates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of a level's experts and gates: a shared x [B, in] feeds both as is; group outputs
    x [T+1, B, in] feed each expert its group's row ([E, B, in]) and each gate its own ([G, B, in]).

    It branches on x.dim(), so it is an FX leaf (torch.fx.wrap below).
    """
    if x.dim() == 2:
        return x, x
    return x.index_select(0, expert_group), x[:num_gates]


torch.fx.wrap("level_inputs")


def shared_input_layers(x: torch.Tensor | FieldParts, layers: list[StackedLinear]) -> tuple[torch.Tensor, ...]:
    """Several StackedLinear layers over one shared input x ([B, in] or FieldParts) as one GEMM:
    x @ [in, Σ K_i*out_i] (+ biases) → one [B, K_i*out_i] block per layer (torch.split views).

    Why: a CGC level's gates are a GEMM of N = G*E (12 for ple) next to the experts' N = E*h; as
    a GEMM of their own they cost a separate, poorly shaped MKL call forward and two backward,
    and (folded fields) a second fold of the field weights. The weights stay separate parameters.
    """
    weights, biases = zip(*(shared_input_weight(layer.weight, layer.bias) for layer in layers))
    weight, bias = torch.cat(weights, dim=1), torch.cat(biases)  # [in, N], [N]
    y = x.linear(weight, bias) if isinstance(x, FieldParts) else torch.addmm(bias, x, weight)  # [B, N]
    return torch.split(y, [layer.num * layer.out_dim for layer in layers], dim=1)  # one SplitBackward (a cat)


class CGCLevel(nn.Module):
    def __init__(self, in_dim: int, hidden: int, num_tasks: int, task_experts: int, shared_experts: int,
                 last: bool, kernel: str, num_scenarios: int = 0, shared_input: bool = False) -> None:
        """num_scenarios > 0 adds scenario-specific gate logits (forward then needs the one-hot).
        shared_input: every input is one [B, in] (a first level): experts and gates share a GEMM.
        (A flag, not a test of x.dim(), so that FX traces the level.)"""
        super().__init__()
        groups = expert_groups(num_tasks, task_experts, shared_experts)
        self.num_tasks, self.kernel, self.shared_input = num_tasks, kernel, shared_input
        self.num_experts = len(groups)
        self.register_buffer("expert_group", torch.tensor(groups), persistent=False)
        self.register_buffer("mask", gate_mask(num_tasks, groups, not last).unsqueeze(1), persistent=False)  # [G, 1, E]
        self.experts = StackedMLP(self.num_experts, in_dim, [hidden])
        self.gates = StackedLinear(self.mask.size(0), in_dim, self.num_experts)
        self.scenario_gate_bias = (nn.Parameter(torch.zeros(self.mask.size(0), num_scenarios, self.num_experts))
                                   if num_scenarios > 0 else None)  # [G, S, E]
        self.out_dim = hidden

    def forward(self, x: torch.Tensor | FieldParts, onehot: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, in] or FieldParts (first level) or [T+1, B, in]; onehot [B, S] with scenario
        gates; returns [G, B, h]."""
        # The experts are one layer (its state_dict keys stay those of a StackedMLP); its ReLU runs
        # inside gate_combine (relu=True), which reads the pre-activations and writes their
        # gradient already masked: no ReLU pass over [E, B, h] forward, none backward.
        layer = self.experts.layers[0]
        if self.shared_input or isinstance(x, FieldParts):  # experts and gates: one GEMM
            pre, gate_y = shared_input_layers(x, [layer, self.gates])  # [B, E*h], [B, G*E] (views)
            pre = stacked_output(pre, layer.num, layer.out_dim, relu=False)  # [E, B, h] view
            logits = gate_y.view(gate_y.size(0), self.mask.size(0), self.num_experts).transpose(0, 1)  # [G, B, E]
        else:
            expert_in, gate_in = level_inputs(x, self.expert_group, self.mask.size(0))
            pre = layer(expert_in)  # [E, B, h]
            logits = self.gates(gate_in)  # [G, B, E]
        if self.scenario_gate_bias is not None:
            logits = logits + torch.matmul(onehot, self.scenario_gate_bias)  # [B, S] @ [G, S, E] → [G, B, E]
        logits = logits + self.mask  # any strides: every gate_combine implementation takes them
        return gate_combine(pre.transpose(0, 1), logits, self.kernel, relu=True)  # [B, E, h] view: no copy


class PLE(nn.Module):
    def __init__(self, in_dim: int, hidden: int, num_tasks: int, levels: int, task_experts: int,
                 shared_experts: int, kernel: str, num_scenarios: int = 0) -> None:
        super().__init__()
        self.levels = nn.ModuleList()
        for i in range(levels):
            self.levels.append(CGCLevel(in_dim, hidden, num_tasks, task_experts, shared_experts,
                                        last=i == levels - 1, kernel=kernel, num_scenarios=num_scenarios,
                                        shared_input=i == 0))
            in_dim = hidden
        self.out_dim = hidden

    def forward(self, x: torch.Tensor | FieldParts, onehot: torch.Tensor | None = None) -> torch.Tensor:
        for level in self.levels:
            x = level(x, onehot)
        return x  # [T, B, h]
