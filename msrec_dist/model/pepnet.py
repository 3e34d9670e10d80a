"""PEPNet (Chang et al., "PEPNet: Parameter and Embedding Personalized Network for Infusing with
Personalized Prior Information", KDD 2023, arXiv:2302.01115): gates computed from prior
information rescale the shared embedding (EPNet, per domain) and every hidden layer of every task
tower (PPNet, per user / item).

    Batch ──FieldEmbedding──► E [B, F, D]   (sparse fields first, in FeatureSpec.kjt_keys order)
    Gate NU  U(x) = γ · sigmoid(W2 · relu(W1 x + b1) + b2)            values in (0, γ), γ = 2
    EPNet   (domain: the scenario)
        x_ep = onehot(scenario) [B, S] ⊕ E(F_d) [B, N_d·D] ⊕ sg(E) [B, F·D]
        δ_domain = U_ep(x_ep)   [B, F] (one gate per field; epnet_gate = element: [B, F·D])
        O_ep = δ_domain ⊗ E  ──flatten──► [B, F·D]
    PPNet   (personal: the sparse fields in personal_features, all sparse fields when empty)
        x_pp = E(F_p) [B, P·D] ⊕ sg(O_ep) [B, F·D]
        tower t, layer l:  H_t^l = relu(H_t^{l-1} W_t^l + b_t^l) ⊗ δ_t^l,  H_t^0 = O_ep
        δ^l = U_pp^l(x_pp) [B, T·h_l] ──► [T, B, h_l]   (one Gate NU per layer, split over the tasks)
        logits: H_t^L ──Linear(h_L, 1)──► [B, T]
    sg = stop-gradient (detach): the gates learn from the shared embedding as an input, but the
    loss reaches the shared embedding only through the scaled path O_ep (and the towers).

Followed: the paper's Gate NU, EPNet and PPNet equations, and alibaba/TorchEasyRec
tzrec/modules/personalized_net.py for what the paper leaves open (each hidden layer's output
gated after its activation; γ = 2; the main input to both gates detached). Unlike TorchEasyRec
(one Gate NU per task and layer), one Gate NU per layer gives the gates of all T towers, split
over them, as the paper's δ_task ∈ R^{h×T}: T times fewer gate networks over the same input.

Differs from the paper / those implementations:
  * the domain-side input is the scenario one-hot (the first gate layer's columns for it are a
    learned scenario embedding of width gate_hidden) plus the optional `domain_features` fields;
    the paper uses domain id and domain statistics features, which these data sets lack;
  * one gate per field by default (our reading of the paper's δ_domain ⊗ E: each feature's
    embedding scaled as a whole); TorchEasyRec gates each embedding element (epnet_gate: element);
  * no dropout; the task towers are `model.tower.hidden` followed by a linear logit layer
    (TorchEasyRec adds an ungated MLP after its gated layers);
  * dense and vector fields (and the scenario field, with model.scenario_field) are fields of E
    like the sparse ones, so EPNet gates them too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from msrec_dist.batch import Batch
from msrec_dist.features import FeatureSpec
from msrec_dist.model.config import ModelConfig
from msrec_dist.model.embedding import FieldEmbedding
from msrec_dist.model.mlp import StackedLinear
from msrec_dist.model.star import scenario_onehot


class GateNU(nn.Module):
    """Gate Neural Unit: [B, in] → Linear → ReLU → Linear → γ·sigmoid → [B, out], values in (0, γ).
    With γ = 2 a gate starts near 1 (sigmoid of a small logit) and can both damp and amplify."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, gamma: float) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, out_dim)
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * torch.sigmoid(self.out(torch.relu(self.hidden(x))))  # [B, out]


def _field_index(names: list[str], fields: list[str], what: str) -> list[int]:
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise ValueError(f"model.pepnet.{what}: {unknown} are not sparse features (have {fields})")
    return [fields.index(n) for n in names]


class PEPNet(nn.Module):
    def __init__(self, cfg: ModelConfig, features: FeatureSpec,
                 embedding_device: torch.device | None = None) -> None:
        super().__init__()
        pep = cfg.pepnet
        self.num_scenarios = features.num_scenarios
        self.num_tasks = num_tasks = len(features.task_names)
        self.embedding = FieldEmbedding(features, cfg.scenario_field, device=embedding_device)
        dim, num_fields = self.embedding.dim, self.embedding.num_fields
        flat_dim = num_fields * dim
        sparse = list(self.embedding.field_names)
        domain = _field_index(pep.domain_features, sparse, "domain_features")
        personal = _field_index(pep.personal_features or sparse, sparse, "personal_features")
        # index buffers (not Python lists) so that the gathers are one index_select each
        self.register_buffer("domain_index", torch.tensor(domain, dtype=torch.int64), persistent=False)
        self.register_buffer("personal_index", torch.tensor(personal, dtype=torch.int64), persistent=False)
        self.has_domain_features = bool(domain)
        self.element_gate = pep.epnet_gate == "element"
        self.epnet = (GateNU(self.num_scenarios + len(domain) * dim + flat_dim, pep.gate_hidden,
                             flat_dim if self.element_gate else num_fields, pep.gamma)
                      if pep.epnet else None)
        widths = list(cfg.tower.hidden)
        if pep.ppnet and not widths:
            raise ValueError("model.pepnet.ppnet scales the towers' hidden layers: model.tower.hidden is empty")
        dims = [flat_dim] + widths
        self.tower_layers = nn.ModuleList(StackedLinear(num_tasks, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.tower_widths = widths
        self.logit = StackedLinear(num_tasks, dims[-1], 1)
        self.ppnet: Optional[nn.ModuleList] = (
            nn.ModuleList(GateNU(len(personal) * dim + flat_dim, pep.gate_hidden, num_tasks * w, pep.gamma)
                          for w in widths)
            if pep.ppnet else None)

    def domain_gate(self, fields: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        """δ_domain: [B, F] (or [B, F·D] with element gates) from the scenario, the domain
        features and the detached fields [B, F, D]."""
        parts = [scenario_onehot(scenario, self.num_scenarios, fields.dtype)]  # [B, S]
        if self.has_domain_features:
            parts.append(fields.index_select(1, self.domain_index).flatten(1))  # [B, N_d·D]
        parts.append(fields.detach().flatten(1))  # [B, F·D]: an input only, no gradient back
        return self.epnet(torch.cat(parts, dim=1))

    def personal_gates(self, fields: torch.Tensor, o_ep: torch.Tensor) -> list[torch.Tensor]:
        """δ^l per tower layer, each [T, B, h_l], from the personal fields of [B, F, D] and the
        detached EPNet output o_ep [B, F·D]."""
        prior = fields.index_select(1, self.personal_index).flatten(1)  # [B, P·D]
        x = torch.cat([prior, o_ep.detach()], dim=1)  # [B, P·D + F·D]
        return [gate(x).unflatten(1, (self.num_tasks, w)).transpose(0, 1)  # [T, B, h_l]
                for gate, w in zip(self.ppnet, self.tower_widths)]

    def embed(self, fields: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        """O_ep [B, F·D]: the fields [B, F, D] scaled by the domain gate (as they are without EPNet)."""
        if self.epnet is None:
            return fields.flatten(1)
        delta = self.domain_gate(fields, scenario)
        if self.element_gate:
            return fields.flatten(1) * delta  # [B, F·D]
        return (fields * delta.unsqueeze(2)).flatten(1)  # [B, F·D]

    def towers(self, x: torch.Tensor, gates: Optional[list[torch.Tensor]]) -> torch.Tensor:
        """x [B, F·D] shared by the T towers → logits [B, T]; each hidden layer's output scaled
        by its gate [T, B, h_l] when given."""
        for i, layer in enumerate(self.tower_layers):
            x = layer(x, relu=True)  # [T, B, h_l]
            if gates is not None:
                x = x * gates[i]  # [T, B, h_l]
        return self.logit(x).squeeze(2).t()  # [B, T]

    def forward(self, batch: Batch) -> torch.Tensor:
        """Returns per-task logits [B, T]."""
        fields = self.embedding(batch.sparse, batch.dense, batch.scenario)  # [B, F, D]
        o_ep = self.embed(fields, batch.scenario)  # [B, F·D]
        gates = self.personal_gates(fields, o_ep) if self.ppnet is not None else None
        return self.towers(o_ep, gates)
