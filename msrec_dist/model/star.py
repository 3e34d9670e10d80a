"""STAR scenario adaptation (Sheng et al., "One Model to Serve All", CIKM 2021).

    x [B, N], scenario [B]
      ──PartitionedNorm──► [B, N]   normalised with the sample's own scenario statistics,
                                     affine = (γ ⊙ γ_s, β + β_s)
      ──StarLinear+ReLU ×L──► [B, H] weight = W ⊙ W_s (star topology), bias = b + b_s
    AuxiliaryNet: [scenario embedding, mean field] ──MLP──► [B, T] added to each task's logit

Training normalises with the statistics of each scenario's rows in the global batch (and updates
that scenario's running statistics only when it has rows in the batch); eval uses the running
statistics. Everything is tensor math on a one-hot [B, S], so the block is FX-traceable.

The sum over ranks is handed in when the model is built (`rank_sum`: a differentiable sum of a
tensor over every rank whose backward sums the gradients over ranks too, e.g.
msrec_dist/distributed/collectives.all_reduce_sum); without one the statistics are this
process's own (a world of one). The norm holds it as a RankSum, which FX traces as an argument
of the leaf function `sum_over_ranks`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx
from torch import nn

from msrec_dist.model.mlp import MLP

SumFn = Callable[[torch.Tensor], torch.Tensor]  # t → the sum of t over ranks (same shape)


def star_weight(shared: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
    """Star-topology weights: shared [in, out] ⊙ scenario-specific [S, in, out] → [S, in, out]."""
    return shared.unsqueeze(0) * scenario


class RankSum:
    """The sum over ranks the model was built with: t → Σ_ranks t, differentiable (its backward
    sums the incoming gradients over ranks too). A plain object, not a module: it holds no state.

    An FX graph's arguments are nodes, tensors and literals, so a trace refers to it as a constant
    attribute of the traced module (as FX stows tensor constants) and calls `sum_over_ranks` on it.
    """

    def __init__(self, fn: SumFn) -> None:
        self.fn = fn

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.fn(t)

    def __fx_create_arg__(self, tracer: torch.fx.Tracer) -> torch.fx.Node:
        name = next((k for k, v in vars(tracer.root).items() if v is self), None)
        if name is None:
            name = tracer.get_fresh_qualname("_rank_sum")
            setattr(tracer.root, name, self)
        return tracer.create_node("get_attr", name, (), {})


@torch.fx.wrap
def sum_over_ranks(t: torch.Tensor, rank_sum: SumFn) -> torch.Tensor:
    """rank_sum(t); an FX leaf, so a traced graph calls the collective instead of tracing into it."""
    return rank_sum(t)


def scenario_moments(x: torch.Tensor, onehot: torch.Tensor, rank_sum: Optional[SumFn] = None,
                     shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-scenario mean and (biased) variance of x [B, N] over its rows; onehot [B, S].

    Returns mean [S, N], var [S, N], count [S]; scenarios without rows get var 0 and a mean no
    row uses (0 without `rank_sum`, the shift with it). With `rank_sum` (the sum over ranks), the
    statistics are those of the global batch, so 2 ranks of B/2 rows normalise exactly like 1
    rank of B rows (up to float order).

    Without: two passes (mean, then centred squares): E[x²] − mean² cancels badly when
    |mean| ≫ std. With: one sum over ranks (forward, and one in backward) instead of two, since
    each collective costs a good part of a small-batch step; it carries count, Σ(x − K) and
    Σ(x − K)² per scenario for a shift K [S, N] that every rank holds (the running mean):
    var = E[(x − K)²] − E[x − K]², exact in real arithmetic and without the cancellation while K
    is near the mean.
    """
    if rank_sum is None:
        sums = torch.cat([onehot.sum(0).unsqueeze(1), onehot.t() @ x], dim=1)  # [S, 1+N]
        count = sums[:, 0]  # [S]
        denom = count.clamp(min=1.0).unsqueeze(1)  # [S, 1]
        mean = sums[:, 1:] / denom  # [S, N]
        centered = x - onehot @ mean  # [B, N]
        var = (onehot.t() @ (centered * centered)) / denom  # [S, N]
        return mean, var, count
    n = x.size(1)
    shift = torch.zeros(onehot.size(1), n, dtype=x.dtype, device=x.device) if shift is None else shift.detach()
    shifted = x - onehot @ shift  # [B, N]
    sums = sum_over_ranks(torch.cat([onehot.sum(0).unsqueeze(1), onehot.t() @ shifted,
                                     onehot.t() @ (shifted * shifted)], dim=1), rank_sum)  # [S, 1+2N]
    count = sums[:, 0]  # [S]
    denom = count.clamp(min=1.0).unsqueeze(1)  # [S, 1]
    m1, m2 = sums[:, 1:1 + n] / denom, sums[:, 1 + n:] / denom  # E[x − K], E[(x − K)²]
    mean = shift + m1  # [S, N]; 0 for a scenario without rows only when K is 0 there
    var = (m2 - m1 * m1).clamp(min=0.0)  # [S, N]
    return mean, var, count


class PartitionedNorm(nn.Module):
    """Per-scenario normalisation; `rank_sum` (the sum over ranks, see the module docstring) makes
    its training statistics those of the global batch."""

    def __init__(self, num_features: int, num_scenarios: int, momentum: float = 0.1, eps: float = 1e-5,
                 rank_sum: Optional[SumFn] = None) -> None:
        super().__init__()
        self.momentum, self.eps, self.num_scenarios = momentum, eps, num_scenarios
        self.rank_sum = None if rank_sum is None else RankSum(rank_sum)
        self.shared_gamma = nn.Parameter(torch.ones(num_features))
        self.shared_beta = nn.Parameter(torch.zeros(num_features))
        self.scenario_gamma = nn.Parameter(torch.ones(num_scenarios, num_features))
        self.scenario_beta = nn.Parameter(torch.zeros(num_scenarios, num_features))
        self.register_buffer("running_mean", torch.zeros(num_scenarios, num_features))
        self.register_buffer("running_var", torch.ones(num_scenarios, num_features))

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var, count = scenario_moments(x, onehot, self.rank_sum, self.running_mean)
            present = (count > 0).unsqueeze(1)  # [S, 1]
            with torch.no_grad():  # not recorded by FX tracing: hence the detach()es
                m = self.momentum
                new_mean = (1 - m) * self.running_mean + m * mean.detach()
                new_var = (1 - m) * self.running_var + m * var.detach()
                self.running_mean.copy_(torch.where(present, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(present, new_var, self.running_var))
        else:
            mean, var = self.running_mean, self.running_var
        row_mean = onehot @ mean  # [B, N]
        row_inv_std = torch.rsqrt(onehot @ var + self.eps)  # [B, N]
        gamma = self.shared_gamma * (onehot @ self.scenario_gamma)  # [B, N]
        beta = self.shared_beta + onehot @ self.scenario_beta  # [B, N]
        return (x - row_mean) * row_inv_std * gamma + beta

    def scenario_eval(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """Eval normalisation of rows that all belong to scenario s: x [n, N] → [n, N]."""
        inv_std = torch.rsqrt(self.running_var[s] + self.eps)  # [N]
        return (x - self.running_mean[s]) * inv_std * (self.shared_gamma * self.scenario_gamma[s]) + (
            self.shared_beta + self.scenario_beta[s])


class StarLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_scenarios: int) -> None:
        super().__init__()
        shared = nn.Linear(in_dim, out_dim)  # for its default init
        self.shared_weight = nn.Parameter(shared.weight.detach().t().contiguous())  # [in, out]
        self.shared_bias = nn.Parameter(shared.bias.detach().clone())  # [out]
        self.scenario_weight = nn.Parameter(torch.ones(num_scenarios, in_dim, out_dim))  # [S, in, out]
        self.scenario_bias = nn.Parameter(torch.zeros(num_scenarios, out_dim))  # [S, out]

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        weight = star_weight(self.shared_weight, self.scenario_weight)  # [S, in, out]
        per_scenario = torch.einsum("bi,sio->bso", x, weight)  # [B, S, out]: S is small (a few surfaces)
        y = (per_scenario * onehot.unsqueeze(2)).sum(1)  # [B, out]
        return y + self.shared_bias + onehot @ self.scenario_bias

    def scenario_forward(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """The layer for rows that all belong to scenario s: x [n, in] → [n, out]."""
        return torch.addmm(self.shared_bias + self.scenario_bias[s], x, self.shared_weight * self.scenario_weight[s])


class StarTrunk(nn.Module):
    """Partitioned norm (optional) followed by star FC layers with ReLU; [B, N] → [B, H].

    `group_by_scenario` (eval only; set by the serving export, msrec_dist/serving/program.py):
    the rows are grouped by scenario and each group runs through its own scenario's weights,
    instead of every row through all S scenarios' weights with the others masked out: S times
    fewer FLOPs, the same values up to float summation order. The group sizes are data: a host
    sync per batch (torch.export keeps them as unbacked sizes), which is why training and the
    training run's own evaluation keep the masked form."""

    def __init__(self, in_dim: int, hidden: list[int], num_scenarios: int, partitioned_norm: bool,
                 momentum: float, rank_sum: Optional[SumFn] = None) -> None:
        super().__init__()
        self.num_scenarios = num_scenarios
        self.norm = (PartitionedNorm(in_dim, num_scenarios, momentum, rank_sum=rank_sum)
                     if partitioned_norm else None)
        dims = [in_dim] + list(hidden)
        self.layers = nn.ModuleList(StarLinear(a, b, num_scenarios) for a, b in zip(dims[:-1], dims[1:]))
        self.out_dim = dims[-1]
        self.group_by_scenario = False

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        if self.group_by_scenario and not self.training:
            return self.grouped_forward(x, onehot)
        if self.norm is not None:
            x = self.norm(x, onehot)
        for layer in self.layers:
            x = layer(x, onehot).relu_()  # in place on a fresh sum: one tensor fewer
        return x

    def grouped_forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Eval forward with the rows grouped by scenario (see the class docstring)."""
        order = torch.argsort(onehot.argmax(1), stable=True)  # [B]: rows of scenario 0 first, then 1, ...
        sizes = onehot.sum(0).long().tolist()  # rows per scenario
        for n in sizes:
            torch._check_is_size(n)
        torch._check(sum(sizes) == x.size(0))
        groups = []
        for s, part in enumerate(torch.split(x.index_select(0, order), sizes)):  # part [n_s, N]
            if self.norm is not None:
                part = self.norm.scenario_eval(part, s)
            for layer in self.layers:
                part = layer.scenario_forward(part, s).relu_()
            groups.append(part)
        grouped = torch.cat(groups)  # [B, H], in `order`
        return grouped.index_select(0, torch.argsort(order))  # back to the batch's row order


class AuxiliaryNet(nn.Module):
    """Scenario embedding + the fields (their mean, or all of them) → per-task logit offset [B, T]."""

    def __init__(self, num_scenarios: int, emb_dim: int, field_dim: int, hidden: list[int], num_tasks: int,
                 num_fields: int = 1, concat: bool = False) -> None:
        super().__init__()
        self.concat = concat
        self.scenario_emb = nn.Embedding(num_scenarios, emb_dim)
        self.mlp = MLP(emb_dim + field_dim * (num_fields if concat else 1), hidden)
        self.out = nn.Linear(self.mlp.out_dim, num_tasks)

    def forward(self, scenario: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        x = fields.flatten(1) if self.concat else fields.mean(1)  # [B, F·D] or [B, D]
        x = torch.cat([self.scenario_emb(scenario), x], dim=1)  # [B, Ds + F·D] or [B, Ds + D]
        return self.out(self.mlp(x))  # [B, T]


def scenario_onehot(scenario: torch.Tensor, num_scenarios: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] one-hot of the scenario ids [B], in `dtype`. A scatter rather than F.one_hot, which
    checks the ids' min and max with two .item() calls (a host sync each on CUDA; the reader has
    already checked every scenario id) and then converts from int64 (29 vs 43 µs at B = 1024)."""
    out = scenario.new_zeros((scenario.size(0), num_scenarios), dtype=dtype)  # a method: FX traces it
    return out.scatter_(1, scenario.unsqueeze(1), 1.0)  # [B, S]
