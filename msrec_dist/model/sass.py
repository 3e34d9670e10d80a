"""SASS: scenario-adaptive transfer and scenario-contrastive pre-training (Zhang et al.,
"Scenario-Adaptive and Self-Supervised Model for Multi-Scenario Personalized Recommendation",
CIKM 2022). S scenarios, T tasks, L transfer layers of widths `model.sass.hidden` = [H_1..H_L].

    Batch ──FieldEmbedding──► fields [B, F, D] ──FieldSelfAttention (model.attention)──► [B, F, D']
          ──flatten──► x [B, F·D']
    (global network, scenario network and ML-SAT: TransferTrunk, also msrec's trunk with model.sass.block)
    global (shared) network:     g_l = ReLU(Linear(g_{l-1})),  g_0 = x                      [B, H_l]
    scenario-specific network:   s̃_l = ReLU(StarLinear(s_{l-1})), s_0 = x  (each row its own
                                 scenario's weights, shared ⊙ scenario: model/star.py)        [B, H_l]
    multi-layer scenario-adaptive transfer (ML-SAT), at every layer l:
        adaptive gate  a_l = σ(StarLinear_a([s̃_l ; g_l]))       how much of the shared layer flows in
        transfer       t_l = a_l ⊙ g_l
        update gate    u_l = σ(StarLinear_u([s̃_l ; t_l]))       how it mixes with the scenario's own
        s_l = u_l ⊙ s̃_l + (1 − u_l) ⊙ t_l                                                    [B, H_l]
    towers: one MLP per task over s_L ──► logits [B, T]

Stage 1 (train.stage: pretrain, SASSPretrainModule): the encoder is the embedding tables, the field
attention and a projection head (the module's own) over the user view; the scenario view of a row (its user fields
and its scenario field) and the global view (the same user fields, the scenario field the mean of
all scenarios' embeddings: the user seen from all scenarios) are contrasted with InfoNCE at
temperature τ, in-batch: every row of the same user (any scenario) is a positive, the other users'
rows are negatives. Stage 2 loads the tables and the attention (--init-from) and fine-tunes this
network; the projection head is dropped, as usual for contrastive heads.

Where this departs from the paper:
- The paper's two towers (user, item) for retrieval become one ranking network over all fields, as
  the rest of the zoo; its pre-training is on user behaviour sequences per scenario, here on the
  user fields of each row (the user id, the user's categorical and history fields).
- The gates' inputs: the paper feeds the scenario-specific and the shared representation of the
  layer (and a scenario bias network); here the gates are per-scenario linear maps (StarLinear) of
  the two representations, so they depend on the scenario through their weights.
- Negatives are the rows of this rank's batch (the paper's in-batch sampling), not of all ranks.
- Stage 1 does not train the scenario embeddings (see SASSPretrainModule.user_views).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msrec_dist.batch import Batch
from msrec_dist.features import FeatureSpec
from msrec_dist.model.attention import FieldSelfAttention
from msrec_dist.model.config import ModelConfig, SASSConfig
from msrec_dist.model.embedding import FieldEmbedding
from msrec_dist.model.fields import FieldParts
from msrec_dist.model.mlp import MLP, StackedMLP
from msrec_dist.model.star import StarLinear, scenario_onehot


class TransferLayer(nn.Module):
    """One ML-SAT layer: the shared and the scenario-specific layer and the two gates."""

    def __init__(self, in_dim: int, out_dim: int, num_scenarios: int) -> None:
        super().__init__()
        self.shared = nn.Linear(in_dim, out_dim)
        self.scenario = StarLinear(in_dim, out_dim, num_scenarios)
        self.adaptive_gate = StarLinear(2 * out_dim, out_dim, num_scenarios)
        self.update_gate = StarLinear(2 * out_dim, out_dim, num_scenarios)

    def forward(self, s: torch.Tensor, g: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        own, g, adaptive, update = self.gates(s, g, onehot)
        transfer = adaptive * g
        return update * own + (1 - update) * transfer, g  # [B, H], [B, H]

    def gates(self, s: torch.Tensor, g: torch.Tensor,
              onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scenario layer's output, shared layer's output, adaptive gate, update gate), each [B, H];
        the gates in (0, 1)."""
        g = F.relu(self.shared(g))  # [B, H]
        own = F.relu(self.scenario(s, onehot))  # [B, H]
        adaptive = torch.sigmoid(self.adaptive_gate(torch.cat([own, g], dim=1), onehot))  # how much of g flows in
        update = torch.sigmoid(self.update_gate(torch.cat([own, adaptive * g], dim=1), onehot))  # the mix
        return own, g, adaptive, update


class TransferTrunk(nn.Module):
    """The ML-SAT stack [B, N] → [B, H_L] (s_0 = g_0 = x): SASS's body, and msrec's trunk with
    model.sass.block (model/zoo.py) in place of STAR or the MLP."""

    def __init__(self, in_dim: int, hidden: list[int], num_scenarios: int) -> None:
        super().__init__()
        dims = [in_dim] + list(hidden)
        self.layers = nn.ModuleList(TransferLayer(a, b, num_scenarios) for a, b in zip(dims[:-1], dims[1:]))
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        s, g = x, x
        for layer in self.layers:
            s, g = layer(s, g, onehot)
        return s  # [B, H_L]


def field_width(model: nn.Module) -> int:
    """D' of a model's attended fields: the attention's output width, or D without attention."""
    return model.attention[-1].out_dim if model.attention is not None else model.embedding.dim


def attended_fields(model: nn.Module, parts: FieldParts, onehot: torch.Tensor,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """The model's attended field stack [B, F, D'] with the scenario field of `onehot` [B, S] (a
    row's own scenario, or for the global view the mean of all scenarios); `keep` [F] (1 or 0)
    zeroes fields before the attention."""
    parts.onehot = onehot
    fields = parts.stack()  # [B, F, D]
    if keep is not None:
        fields = fields * keep[:, None]
    return model.attention(fields) if model.attention is not None else fields


class SASS(nn.Module):
    def __init__(self, cfg: ModelConfig, features: FeatureSpec, embedding_device: torch.device | None = None) -> None:
        super().__init__()
        sass = cfg.sass
        self.num_scenarios = features.num_scenarios
        self.num_tasks = len(features.task_names)
        self.embedding = FieldEmbedding(features, cfg.scenario_field, device=embedding_device)
        att = cfg.attention
        self.attention = (FieldSelfAttention(self.embedding.dim, att.heads, att.head_dim, att.layers, cfg.kernels)
                          if att.enabled else None)
        self.trunk = TransferTrunk(self.embedding.num_fields * field_width(self), sass.hidden, self.num_scenarios)
        self.towers = StackedMLP(self.num_tasks, self.trunk.out_dim, list(cfg.tower.hidden) + [1],
                                 final_activation=False)
        if not cfg.scenario_field:
            raise ValueError("model.arch=sass needs model.scenario_field: its views differ by the scenario field")

    def forward(self, batch: Batch) -> torch.Tensor:
        onehot = scenario_onehot(batch.scenario, self.num_scenarios, batch.dense.dtype)  # [B, S]
        parts = self.embedding.parts(batch.sparse, batch.dense, batch.scenario)
        s = self.trunk(attended_fields(self, parts, onehot).flatten(1), onehot)  # [B, H_L]
        return self.towers(s.unsqueeze(0).expand(self.num_tasks, -1, -1)).squeeze(2).t()  # [B, T]


def info_nce(anchor: torch.Tensor, other: torch.Tensor, same: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive InfoNCE: anchor, other [B, P] (normalised), same [B, B] bool (positives;
    the diagonal must be among them) → mean over rows of −log Σ_pos exp(sim/τ) / Σ_all exp(sim/τ)."""
    logits = anchor @ other.t() / temperature  # [B, B]
    positive = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)  # [B]
    return (torch.logsumexp(logits, dim=1) - positive).mean()


class SASSPretrainModule(nn.Module):
    """Stage 1's train module: the symmetric contrastive loss (scenario → global and global →
    scenario views) of each row's user, through the network's tables and attention and a
    projection head of its own (model.sass.projection), which fine-tuning does not load. Returns
    (loss, (loss, logits, labels)) as MultiTaskTrainModule (model/zoo.py), the train loops'
    contract; logits are zeros [B, T] (no task is trained)."""

    def __init__(self, model: nn.Module, cfg: SASSConfig) -> None:
        super().__init__()
        # SASS, or msrec's network (model.sass.block or not): the views go through its tables and
        # field attention; M3oE and PEPNet have no attention to pre-train
        if not (hasattr(model, "attention") and hasattr(model, "embedding") and model.embedding.scenario_emb is not None):
            raise ValueError("train.stage=pretrain needs model.arch sass or msrec (with model.scenario_field)")
        names = model.embedding.field_names
        unknown = [f for f in cfg.user_fields + [cfg.user_id_feature] + cfg.view_drop if f not in names]
        if unknown:
            raise ValueError(f"model.sass.user_fields / user_id_feature / view_drop: {unknown} are not sparse features "
                             f"(have {names})")
        self.model = model
        self.temperature = cfg.temperature
        self.user_fields = [names.index(f) for f in (cfg.user_fields or [cfg.user_id_feature])]
        self.user_id_key = cfg.user_id_feature
        self.head = MLP((len(self.user_fields) + 1) * field_width(model), list(cfg.projection), final_activation=False)
        keep = torch.ones(model.embedding.num_fields)
        keep[[names.index(f) for f in cfg.view_drop]] = 0.0
        # [F], or None: no field dropped
        self.register_buffer("scenario_view_keep", keep if cfg.view_drop else None, persistent=False)

    def user_views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(scenario view, global view) of each row's user, L2-normalised [B, P] each."""
        model = self.model
        own = scenario_onehot(batch.scenario, model.num_scenarios, batch.dense.dtype)  # [B, S]
        every = torch.full_like(own, 1.0 / model.num_scenarios)  # the mean of the scenario embeddings
        index = self.user_fields + [model.embedding.num_fields - 1]  # the scenario field is the last
        parts = model.embedding.parts(batch.sparse, batch.dense, batch.scenario)  # one lookup, two views
        # The scenario embeddings stay out of stage 1: pulling a scenario's view onto the global
        # one would otherwise collapse them onto their mean, and fine-tuning would start with the
        # scenarios indistinct (the small scenario's eval AUC fell from 0.79 to 0.62 on the
        # small-scenario synthetic set, one seed)
        parts.scenario_weight = parts.scenario_weight.detach()
        views = []
        for onehot, keep in ((own, self.scenario_view_keep), (every, None)):
            fields = attended_fields(model, parts, onehot, keep)[:, index]  # [B, F_u + 1, D']
            views.append(F.normalize(self.head(fields.flatten(1)), dim=1))  # [B, P]
        return views[0], views[1]

    def user_ids(self, batch: Batch) -> torch.Tensor:
        """[B] each row's first id of the user id feature (a row without one: -1 - row, a user of
        its own)."""
        jt = batch.sparse[self.user_id_key]
        lengths, values = jt.lengths().long(), jt.values().long()  # [B], [N]
        starts = torch.cumsum(lengths, 0) - lengths  # [B]
        first = values[starts.clamp(max=max(values.numel() - 1, 0))] if values.numel() else starts
        return torch.where(lengths > 0, first, -1 - torch.arange(lengths.numel(), device=lengths.device))

    def forward(self, batch: Batch):
        scen, glob = self.user_views(batch)  # [B, P] each
        if batch.size == 0:  # a rank whose data ran out: a zero loss over the same weights
            loss = (scen.sum() + glob.sum()) * 0.0
        else:
            users = self.user_ids(batch)
            same = users.unsqueeze(0) == users.unsqueeze(1)  # [B, B], diagonal true
            loss = 0.5 * (info_nce(scen, glob, same, self.temperature) + info_nce(glob, scen, same, self.temperature))
        zeros = batch.labels.new_zeros(batch.labels.shape)
        return loss, (loss.detach(), zeros, batch.labels.detach())
