"""The model zoo: one `MultiScenarioModel` whose blocks are switched by `ModelConfig`.

    Batch ──FieldEmbedding──► fields [B, F, D]   (fold_fields: FieldParts, read by the first layer)
          ──FieldSelfAttention (opt.)──► [B, F, D'] ──flatten──► [B, F·D']
          ──trunk: StarTrunk (PN + star FC), SASS's TransferTrunk (model.sass.block) or plain MLP──► [B, H]
          ──experts: PLE/MMoE (CGC levels) or none──► [T, B, h]
          ── + BalancedMixing (opt.) ──► [T, B, h]
          ──towers (one MLP per task, stacked)──► [B, T] logits (+ AuxiliaryNet offset, opt.)

Configs in configs/ pick the blocks: msrec = everything, shared_bottom = MLP trunk + towers,
mmoe = 1 CGC level of shared experts, ple = CGC levels, star = STAR trunk + towers.
`build_model` picks the network by `model.arch`: this one, or M3oE (model/m3oe.py) or PEPNet
(model/pepnet.py), the published multi-domain models compared against it, or SASS (model/sass.py),
the family's pre-trained transfer network.

The model is built from its config (msrec_dist/model/config.py) and the feature specs
(msrec_dist/features.py); it knows no data files and no process group. What a world of several
ranks needs is handed in: `rank_sum`, the sum over ranks of the partitioned norm's statistics,
at build time (msrec_dist/model/star.py), and a pooled lookup after sharding
(FieldEmbedding.use_pooled_lookup).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from msrec_dist.batch import Batch
from msrec_dist.features import FeatureSpec
from msrec_dist.model.attention import FieldSelfAttention
from msrec_dist.model.config import ModelConfig
from msrec_dist.model.embedding import FieldEmbedding
from msrec_dist.model.fields import FieldParts
from msrec_dist.model.mixing import BalancedMixing
from msrec_dist.model.mlp import MLP, StackedMLP
from msrec_dist.model.ple import PLE
from msrec_dist.model.sass import TransferTrunk
from msrec_dist.model.star import AuxiliaryNet, StarTrunk, SumFn, scenario_onehot


class MultiScenarioModel(nn.Module):
    def __init__(self, cfg: ModelConfig, features: FeatureSpec, rank_sum: Optional[SumFn] = None,
                 embedding_device: torch.device | None = None) -> None:
        """`rank_sum` (t → its sum over ranks, differentiable; None in a world of one) makes the
        partitioned norm use global-batch statistics. (The embedding gradients' scale is the
        sharding's to set: FieldEmbedding.set_grad_scales.)"""
        super().__init__()
        self.num_scenarios = features.num_scenarios
        self.num_tasks = num_tasks = len(features.task_names)
        self.embedding = FieldEmbedding(features, cfg.scenario_field, device=embedding_device)
        field_dim = self.embedding.dim
        att = cfg.attention
        self.attention = (FieldSelfAttention(field_dim, att.heads, att.head_dim, att.layers, cfg.kernels)
                          if att.enabled else None)
        flat_dim = self.embedding.num_fields * (self.attention.out_dim if self.attention else field_dim)
        star = cfg.star
        if cfg.sass.block and star.enabled:
            raise ValueError("model.sass.block replaces the trunk: set model.star.enabled=false")
        if cfg.sass.block:  # SASS's transfer layers as the trunk (model/sass.py)
            self.trunk = TransferTrunk(flat_dim, cfg.sass.hidden, features.num_scenarios)
        elif star.enabled:
            self.trunk: nn.Module = StarTrunk(flat_dim, star.hidden, features.num_scenarios, star.partitioned_norm,
                                              star.norm_momentum, rank_sum=rank_sum)
        else:
            self.trunk = MLP(flat_dim, cfg.bottom.hidden)
            self.trunk.out_dim = self.trunk.out_dim if cfg.bottom.hidden else flat_dim
        trunk_dim = self.trunk.out_dim
        self.aux = (AuxiliaryNet(features.num_scenarios, star.scenario_emb_dim, field_dim, star.aux_hidden, num_tasks,
                                 self.embedding.num_fields, star.aux_input == "concat")
                    if star.enabled and star.aux_net else None)
        ex = cfg.experts
        self.experts = (PLE(trunk_dim, ex.hidden, num_tasks, ex.levels, ex.task_experts, ex.shared_experts,
                            cfg.kernels, features.num_scenarios if ex.scenario_gates else 0)
                        if ex.kind == "cgc" else None)
        expert_dim = self.experts.out_dim if self.experts else trunk_dim
        self.expert_residual = self.experts is not None and ex.residual
        if self.expert_residual and trunk_dim != expert_dim:
            raise ValueError(f"model.experts.residual needs the trunk width ({trunk_dim}) to equal "
                             f"model.experts.hidden ({expert_dim})")
        self.mixing = None
        if cfg.mixing.enabled:
            if self.experts is not None and cfg.mixing.hidden != expert_dim:
                raise ValueError(f"model.mixing.hidden ({cfg.mixing.hidden}) must equal model.experts.hidden "
                                 f"({expert_dim}): the mix is added to the expert output")
            self.mixing = BalancedMixing(trunk_dim, cfg.mixing.hidden, features.num_scenarios, num_tasks,
                                         cfg.mixing.own_weight_init, cfg.mixing.scale_init)
            expert_dim = cfg.mixing.hidden
        self.tower_scenarios = features.num_scenarios if cfg.tower.per_scenario else 1
        self.towers = StackedMLP(self.tower_scenarios * num_tasks, expert_dim, list(cfg.tower.hidden) + [1],
                                 final_activation=False)
        # identity when 0: no module, so configs without dropout keep their graph and speed
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        # the blocks that read the scenario one-hot (plain MLP/PLE/MMoE models skip building it)
        self.uses_onehot = star.enabled or cfg.sass.block or self.mixing is not None or (
            self.experts is not None and ex.scenario_gates) or cfg.tower.per_scenario
        # the first layer folds the dense and scenario fields into its weight (model/fields.py)
        # where it is linear and the only reader of the field stack: the bottom MLP's first
        # Linear, or (no bottom) the first CGC level's experts and gates
        self.fold_fields = cfg.fold_fields and self.attention is None and not star.enabled and not cfg.sass.block and (
            bool(cfg.bottom.hidden) or (self.experts is not None and not self.expert_residual
                                        and self.mixing is None))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns per-task logits [B, T]."""
        if self.fold_fields:
            fields = None
            x = self.embedding.parts(batch.sparse, batch.dense, batch.scenario)  # FieldParts: [B, F·D] factored
        else:
            fields = self.embedding(batch.sparse, batch.dense, batch.scenario)  # [B, F, D]
            x = self.attention(fields) if self.attention is not None else fields  # [B, F, D']
            x = x.flatten(1)  # [B, F·D']
        onehot = None  # [B, S]
        if self.uses_onehot:  # the parts' own one-hot where they have one (the scenario field)
            onehot = x.onehot if isinstance(x, FieldParts) and x.onehot is not None else \
                scenario_onehot(batch.scenario, self.num_scenarios, batch.dense.dtype)
        h = self.trunk(x, onehot) if isinstance(self.trunk, (StarTrunk, TransferTrunk)) else self.trunk(x)  # [B, H]
        if self.dropout is not None:
            h = self.dropout(h)
        if self.experts is not None:
            task_in = self.experts(h, onehot)  # [T, B, h]
            if self.expert_residual:
                task_in = task_in + h.unsqueeze(0)  # [T, B, h]
        else:
            task_in = h.unsqueeze(0).expand(self.num_tasks, -1, -1)  # [T, B, H]
        if self.mixing is not None:
            task_in = task_in + self.mixing(h, onehot)  # [T, B, h]
        if self.dropout is not None:
            task_in = self.dropout(task_in)
        if self.tower_scenarios > 1:  # every (scenario, task) tower on every row, each row's own picked
            S, T = self.tower_scenarios, self.num_tasks
            out = self.towers(task_in.repeat(S, 1, 1)).view(S, T, -1)  # [S, T, B]
            logits = (out * onehot.t().unsqueeze(1)).sum(0).t()  # [B, T]
        else:
            logits = self.towers(task_in).squeeze(2).t()  # [B, T]
        if self.aux is not None:
            logits = logits + self.aux(batch.scenario, fields)
        return logits


def build_model(cfg: ModelConfig, features: FeatureSpec, rank_sum: Optional[SumFn] = None,
                embedding_device: torch.device | None = None) -> nn.Module:
    """The network `cfg.arch` names. Every one has `.embedding` (a FieldEmbedding: the sharding
    finds its EBC there), `.num_tasks`, `.num_scenarios`, and forward(batch) → logits [B, T]."""
    if cfg.arch == "m3oe":
        from msrec_dist.model.m3oe import M3oE

        return M3oE(cfg, features, embedding_device=embedding_device)
    if cfg.arch == "pepnet":
        from msrec_dist.model.pepnet import PEPNet

        return PEPNet(cfg, features, embedding_device=embedding_device)
    if cfg.arch == "sass":
        from msrec_dist.model.sass import SASS

        return SASS(cfg, features, embedding_device=embedding_device)
    return MultiScenarioModel(cfg, features, rank_sum=rank_sum, embedding_device=embedding_device)


class MultiTaskTrainModule(nn.Module):
    """Owns the loss: weighted sum over tasks of the mean binary cross-entropy.

    Returns (loss, (loss, logits, labels)) with the inner three detached, the contract of
    torchrec's train pipelines. An empty local batch (a rank whose data ran out) gives loss 0.
    """

    def __init__(self, model: nn.Module, task_weights: list[float]) -> None:
        super().__init__()
        self.model = model
        weights = task_weights or [1.0] * model.num_tasks
        if len(weights) != model.num_tasks:
            raise ValueError(f"train.task_weights has {len(weights)} entries for {model.num_tasks} tasks")
        self.register_buffer("task_weights", torch.tensor(weights), persistent=False)

    def forward(self, batch: Batch):
        logits = self.model(batch)  # [B, T]
        per_sample = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        count = torch.ones_like(batch.labels[:, 0]).sum().clamp(min=1.0)
        loss = (per_sample * self.task_weights).sum() / count
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())
