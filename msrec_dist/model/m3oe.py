"""M3oE: multi-domain multi-task mixture of experts (Zhang et al., "M3oE: Multi-Domain Multi-Task
Mixture-of Experts Recommendation Framework", SIGIR 2024), after the authors' `MDMTRec` in
github.com/Applied-Machine-Learning-Lab/M3oE, MDMTRec/models/multi_domain/model.py (defaults:
examples/run_movielens.py). Domain = scenario; S domains, T tasks, E shared experts.

    Batch ──FieldEmbedding──► fields [B, F, D] ──flatten──► x [B, F·D]
    domain representation (bottom, `m3oe.bottom` = [H0, ..., H]):
        StarLinear: x (W ⊙ W_d) + b + b_d, d the row's domain ──Linear+LN+ReLU layers──► [B, H]
        + skip: x ──Linear+LN+ReLU──► [B, H]                                 = h [B, H]
    multi-view experts (Linear+LN+ReLU layers on h, one stacked GEMM for all E + S + T):
        shared [E, B, h'], domain [S, B, h'] (one per domain), task [T, B, h'] (one per task)
    level 1, balance:  domain mix of a row of domain d = α dom_d + (1−α)/(S−1) Σ_{j≠d} dom_j   [B, h']
                       task mix of task t = β task_t + (1−β)/(T−1) Σ_{u≠t} task_u           [T, B, h']
    shared mix: gate (d, t) = softmax(Linear(h)) over the E shared experts, d the row's own   [T, B, h']
    level 2, fusion:   fused[t] = shared mix[t] + w_d · domain mix + w_t · task mix[t]        [T, B, h']
    towers: one per (domain, task), Linear+LN+ReLU per `tower.hidden` then → 1; a row of domain
            d reads towers (d, ·)                                                            [B, T] logits
    α, β, w_d, w_t = sigmoid(learned scalars), initial logits from `m3oe.*_init`

What differs from the authors' code:
- AutoML is simplified to learned fusion weights: their four weights are DARTS-style
  architecture parameters with a second Adam stepped on one training batch per epoch; here they
  are ordinary parameters trained by the loss with the rest. (Their main optimizer keeps a
  parameter when `~ darts_para_flag(name)`, the bitwise not of a bool, always truthy: it trains
  the four weights with the model too.)
- They run every (domain, task) gate, fusion and tower on every row and keep the row's domain at
  the end; here the gates and the domain mix are those of the row's own domain only (the same
  values for that row), the towers run for every domain and the row's own are gathered.
- The star layer's domain weights start at 1 (STAR's init, model/star.py), not Xavier, so
  W ⊙ W_d starts as one plain Linear shared by the domains.
- Logits out (the train module's BCE applies the sigmoid), one mean over the rows instead of
  their sum over (domain, task) of per-group means; dense features enter as FieldEmbedding fields.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msrec_dist.batch import Batch
from msrec_dist.features import FeatureSpec
from msrec_dist.kernels import gate_combine
from msrec_dist.model.config import ModelConfig
from msrec_dist.model.embedding import FieldEmbedding
from msrec_dist.model.mixing import balanced_mixing_matrix
from msrec_dist.model.mlp import StackedLinear
from msrec_dist.model.star import StarLinear, scenario_onehot

torch.fx.wrap("balanced_mixing_matrix")  # an FX leaf here too: wrap patches the calling module's globals


def norm_mlp(in_dim: int, widths: list[int]) -> nn.Sequential:
    """Linear → LayerNorm → ReLU per width: the authors' MLP_N."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_dim, width), nn.LayerNorm(width), nn.ReLU()]
        in_dim = width
    return nn.Sequential(*layers)


class StackedNormMLP(nn.Module):
    """K independent MLP_Ns of equal widths: [B, in] (shared input) or [K, B, in] → [K, B, out];
    each LayerNorm has its own affine per MLP, as K separate MLP_Ns would."""

    def __init__(self, num: int, in_dim: int, widths: list[int]) -> None:
        super().__init__()
        dims = [in_dim] + list(widths)
        self.linears = nn.ModuleList(StackedLinear(num, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.gammas = nn.ParameterList(nn.Parameter(torch.ones(num, 1, b)) for b in widths)
        self.betas = nn.ParameterList(nn.Parameter(torch.zeros(num, 1, b)) for b in widths)
        self.widths = list(widths)
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear, gamma, beta, width in zip(self.linears, self.gammas, self.betas, self.widths):
            x = torch.relu(F.layer_norm(linear(x), (width,)) * gamma + beta)  # [K, B, width]
        return x


class DomainBottom(nn.Module):
    """The authors' star part: a star layer (shared ⊙ domain weights, no activation), MLP_N layers
    after it, plus an MLP_N skip from the input; [B, in] → [B, widths[-1]]."""

    def __init__(self, in_dim: int, widths: list[int], num_scenarios: int) -> None:
        super().__init__()
        self.star = StarLinear(in_dim, widths[0], num_scenarios)
        self.mlp = norm_mlp(widths[0], widths[1:])
        self.skip = norm_mlp(in_dim, widths[-1:])
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.star(x, onehot)) + self.skip(x)  # [B, H]


class M3oE(nn.Module):
    def __init__(self, cfg: ModelConfig, features: FeatureSpec, embedding_device: torch.device | None = None) -> None:
        super().__init__()
        m = cfg.m3oe
        self.num_scenarios = s = features.num_scenarios
        self.num_tasks = t = len(features.task_names)
        self.num_shared = e = m.shared_experts
        self.kernel = cfg.kernels
        self.detach_gates = m.detach_gates
        self.embedding = FieldEmbedding(features, cfg.scenario_field, device=embedding_device)
        in_dim = self.embedding.num_fields * self.embedding.dim
        self.bottom = DomainBottom(in_dim, list(m.bottom), s) if m.bottom else None
        h = self.bottom.out_dim if self.bottom is not None else in_dim
        self.experts = StackedNormMLP(e + s + t, h, list(m.expert_hidden))  # shared, then domain, then task
        self.gates = nn.Linear(h, s * t * e)  # one softmax gate over the shared experts per (domain, task)
        self.domain_balance = nn.Parameter(torch.tensor(m.domain_balance_init))  # α = σ(·)
        self.task_balance = nn.Parameter(torch.tensor(m.task_balance_init))  # β = σ(·)
        self.domain_fusion = nn.Parameter(torch.tensor(m.domain_fusion_init))  # w_d = σ(·)
        self.task_fusion = nn.Parameter(torch.tensor(m.task_fusion_init))  # w_t = σ(·)
        # tower d·T + t serves task t of domain d
        self.towers = StackedNormMLP(s * t, self.experts.out_dim, list(cfg.tower.hidden))
        self.tower_out = StackedLinear(s * t, self.towers.out_dim, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns per-task logits [B, T]."""
        x = self.embedding(batch.sparse, batch.dense, batch.scenario).flatten(1)  # [B, F·D]
        onehot = scenario_onehot(batch.scenario, self.num_scenarios, x.dtype)  # [B, S]
        h = self.bottom(x, onehot) if self.bottom is not None else x  # [B, H]
        experts = self.experts(h)  # [E+S+T, B, h']
        e, s = self.num_shared, self.num_scenarios
        fused = self.fuse(h, experts[:e], experts[e:e + s], experts[e + s:], batch.scenario, onehot)  # [T, B, h']
        return self.predict(fused, batch.scenario)

    def balance_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Level 1: [S, S] over the domain experts and [T, T] over the task experts, row d (t) the
        weights of domain d's (task t's) mix: σ(logit) on the diagonal, the rest shared evenly."""
        return (balanced_mixing_matrix(self.domain_balance.expand(self.num_scenarios)),
                balanced_mixing_matrix(self.task_balance.expand(self.num_tasks)))

    def fuse(self, h: torch.Tensor, shared: torch.Tensor, domain: torch.Tensor, task: torch.Tensor,
             scenario: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """Experts shared [E, B, h'], domain [S, B, h'], task [T, B, h'] → fused [T, B, h'] for each
        row's own domain."""
        b, t, e = scenario.size(0), self.num_tasks, self.num_shared
        gate_in = h.detach() if self.detach_gates else h
        logits = self.gates(gate_in).view(b, self.num_scenarios, t * e)  # [B, S, T·E]
        own = logits.gather(1, scenario.view(-1, 1, 1).expand(-1, 1, t * e))  # [B, 1, T·E]: the row's domain
        shared_mix = gate_combine(shared.transpose(0, 1), own.view(b, t, e).transpose(0, 1), self.kernel)  # [T, B, h']
        domain_balance, task_balance = self.balance_matrices()
        domain_mix = torch.einsum("bs,sbh->bh", onehot @ domain_balance, domain)  # [B, h']
        task_mix = torch.einsum("tu,ubh->tbh", task_balance, task)  # [T, B, h']
        return (shared_mix + torch.sigmoid(self.domain_fusion) * domain_mix.unsqueeze(0)
                + torch.sigmoid(self.task_fusion) * task_mix)  # [T, B, h']

    def predict(self, fused: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        """fused [T, B, h'] → logits [B, T] of the towers of each row's domain."""
        b, s, t = scenario.size(0), self.num_scenarios, self.num_tasks
        # every domain's towers on every row (towers are small next to the bottom), then the own picked
        out = self.tower_out(self.towers(fused.repeat(s, 1, 1)))  # [S·T, B, 1]
        out = out.view(s, t, b).permute(2, 0, 1)  # [B, S, T]
        return out.gather(1, scenario.view(-1, 1, 1).expand(-1, 1, t)).squeeze(1)  # [B, T]
