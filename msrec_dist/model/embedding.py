"""Embedding layer: sparse ids, dense values and the scenario id → one stack of D-dim fields.

    batch.sparse  KJT, F_s features ──EmbeddingBagCollection (sum pooling)──► KeyedTensor [B, F_s * D]
                  ──to_dict, stacked in KJT key order──► [B, F_s, D]; mean-pooled features
                  divided by their bag length
                  (with a pooled lookup: ──lookup──► [B, F_s * D] already in KJT key order)
    batch.dense   [B, N_d + Σ K_v]: the N_d scalar columns ──x_n * w_n + b_n per feature──► [B, N_d, D];
                  each vector feature's K_v columns ──nn.Linear(K_v, D)──► one field [B, 1, D]
                  (after the sparse fields, before the scalars; without vectors: no slicing, no projections)
    batch.scenario [B] ──one-hot [B, S] @ nn.Embedding(S, D).weight──► [B, 1, D]   (only if scenario_field)
    concat ──► fields [B, F, D],  F = F_s + N_v + N_d (+1)   (sparse, vector, dense, scenario)
    (parts(): the same in factored form, FieldParts, for a first layer that folds the dense and
    scenario fields into its weight: msrec_dist/model/fields.py)

Sparse fields follow the KJT key order (`FeatureSpec.kjt_keys`: features grouped by table). The
pooling runs through the EBC, whose (possibly sharded) output is picked by name, unless a pooled
lookup was handed in (`use_pooled_lookup`): a callable over the EBC's own weights that returns
the pooled fields in KJT key order, without the EBC's KeyedTensor (the sharding's local lookup,
msrec_dist/distributed/local_lookup.py). The EBC stays the registered submodule either way, so
the state dict, the sharding plan and the optimizers see the same module.

All tables use SUM pooling in the EBC so that features of different pooling can share a table
(torchrec pools per table); a mean feature is the sum divided by max(length, 1), an empty bag
is a zero vector. Without a pooled lookup the EBC is called directly on `batch.sparse` so
torchrec's train pipelines can find it by FX tracing; nothing here branches on tensor values.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msrec_dist.features import FeatureSpec
from msrec_dist.model.fields import FieldParts
from msrec_dist.model.star import scenario_onehot

PooledLookup = Callable[[KeyedJaggedTensor], torch.Tensor]  # KJT → [B, F_s * D], fields in KJT key order


def scale_grad(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Identity forward, gradient multiplied by `scale` (a float, or a tensor broadcast against x;
    FX-traceable: no autograd.Function)."""
    if isinstance(scale, float) and scale == 1.0:
        return x
    return x * scale + x.detach() * (1.0 - scale)


def embedding_dim(features: FeatureSpec) -> int:
    """The one field width D shared by every table (the field stack needs equal widths)."""
    dims = {t.name: t.dim for t in features.tables()}
    if len(set(dims.values())) != 1:
        raise ValueError(f"all embedding tables must have the same dim to form the field stack, got {dims}")
    return next(iter(dims.values()))


class FieldEmbedding(nn.Module):
    def __init__(self, features: FeatureSpec, scenario_field: bool, grad_scale: float = 1.0,
                 device: torch.device | None = None) -> None:
        super().__init__()
        tables = features.tables()
        self.dim = embedding_dim(features)
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.num_embeddings,
                                       feature_names=list(t.feature_names), pooling=PoolingType.SUM)
                    for t in tables],
            device=device,
        )
        # Fields follow the KJT key order (features grouped by table). The EBC's output order is
        # not fixed: a sharded EBC orders its KeyedTensor by shard placement, so its fields are
        # picked by name.
        self.field_names = features.kjt_keys
        # Not a submodule: it reads the EBC's weights, which the EBC's state_dict holds.
        self._pooled_lookup: Optional[PooledLookup] = None
        pooling = {f.name: f.pooling for f in features.sparse}
        self.register_buffer("is_mean", torch.tensor([pooling[f] == "mean" for f in self.field_names]),
                             persistent=False)
        self.num_sparse = len(self.field_names)
        self.field_tables = [f.table for f in features.kjt_features()]  # in field_names order
        # Per sparse field [F_s, 1], set by the sharding (set_grad_scales); grad_scale_value is the
        # float when every field has the same scale.
        self.register_buffer("grad_scale", torch.full((self.num_sparse, 1), grad_scale), persistent=False)
        self.grad_scale_value: Optional[float] = grad_scale
        num_dense = len(features.dense_scalars())  # the first num_dense columns of batch.dense
        self.dense_weight = nn.Parameter(torch.randn(num_dense, self.dim) * 0.1)  # [N_d, D]
        self.dense_bias = nn.Parameter(torch.zeros(num_dense, self.dim))  # [N_d, D]
        self.scenario_emb = nn.Embedding(features.num_scenarios, self.dim) if scenario_field else None
        # Vector features (dense with dim K): one field each, K → D; their columns follow the scalars'.
        # An empty ModuleList holds no parameters: configs without vectors keep their state dict.
        self.num_dense = num_dense
        self.vector_dims = [f.dim for f in features.dense_vectors()]
        self.vector_proj = nn.ModuleList([nn.Linear(k, self.dim, device=device) for k in self.vector_dims])
        self.num_fields = len(self.field_names) + len(self.vector_dims) + num_dense + (1 if scenario_field else 0)

    @torch.no_grad()
    def set_grad_scales(self, model_parallel: float, replicated: set[str]) -> None:
        """Fields of model-parallel tables get `model_parallel`, fields of the `replicated`
        (data_parallel) tables 1: those are averaged over ranks with the dense gradients. The
        sharding decides the scales (msrec_dist/distributed/sharding.py model_parallel_grad_scale)."""
        for i, table in enumerate(self.field_tables):
            self.grad_scale[i] = 1.0 if table in replicated else model_parallel
        values = set(self.grad_scale.flatten().tolist())
        self.grad_scale_value = values.pop() if len(values) == 1 else None

    def use_pooled_lookup(self, lookup: Optional[PooledLookup]) -> None:
        """Pool the sparse fields through `lookup` (KJT → [B, F_s * D], fields in KJT key order)
        instead of the EBC's KeyedTensor; None: through the EBC again. The lookup must read the
        EBC's own weights (the EBC stays registered: state dict, plan and optimizers are as
        without it) and is called in eager mode only: an FX trace must find the EBC."""
        self._pooled_lookup = lookup

    @property
    def pooled_lookup(self) -> Optional[PooledLookup]:
        return self._pooled_lookup

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        return self.parts(sparse, dense, scenario).stack()  # [B, F, D]

    def parts(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, scenario: torch.Tensor) -> FieldParts:
        """The fields in factored form (msrec_dist/model/fields.py): a first linear layer can fold
        the dense and scenario fields into its weight instead of reading the [B, F, D] stack."""
        batch_size = dense.size(0)
        if isinstance(sparse, KeyedJaggedTensor) and sparse.keys() != self.field_names:  # (not when FX tracing)
            raise ValueError(f"KJT keys {sparse.keys()} are not in the expected order {self.field_names} "
                             "(FeatureSpec.kjt_keys: sparse features grouped by table)")
        if self._pooled_lookup is not None:
            pooled = self._pooled_lookup(sparse).view(batch_size, self.num_sparse, self.dim)  # [B, F_s, D]
        else:
            by_name = self.ebc(sparse).to_dict()  # {feature: [B, D]}
            pooled = torch.stack([by_name[f] for f in self.field_names], dim=1)  # [B, F_s, D]
        pooled = scale_grad(pooled, self.grad_scale if self.grad_scale_value is None else self.grad_scale_value)
        lengths = sparse.lengths().view(self.num_sparse, batch_size)  # [F_s, B]
        divisor = torch.where(self.is_mean.unsqueeze(1), lengths.clamp(min=1), torch.ones_like(lengths))
        pooled = pooled / divisor.t().unsqueeze(2).to(pooled.dtype)  # [B, F_s, D]
        if self.vector_dims:  # python ints only: FX-traceable
            vectors, col = [], self.num_dense
            for proj, k in zip(self.vector_proj, self.vector_dims):
                vectors.append(proj(dense[:, col:col + k]))  # [B, D]
                col += k
            pooled = torch.cat([pooled, torch.stack(vectors, dim=1)], dim=1)  # [B, F_s + N_v, D]
            dense = dense[:, :self.num_dense]  # [B, N_d]
        parts = FieldParts(pooled, dense, self.dense_weight, self.dense_bias)  # dense fields: x_n * w_n + b_n
        if self.scenario_emb is not None:
            # The scenario field is a [B, S] @ [S, D] product instead of an embedding lookup: S is a
            # handful of surfaces, and the lookup's CPU backward (sort + scatter) costs ~0.2 ms a
            # step, this GEMM's a few µs. Same values (one-hot rows pick weight rows).
            parts.onehot = scenario_onehot(scenario, self.scenario_emb.num_embeddings, pooled.dtype)  # [B, S]
            parts.scenario_weight = self.scenario_emb.weight  # [S, D]
        return parts
