"""A trained model as a function of plain tensors, and its torch.export program.

    ServingModule(values_0, lengths_0, ..., values_{F-1}, lengths_{F-1}, dense, scenario) → probs
        values_f  [N_f] int64   ids of sparse feature f (KJT key order: features grouped by table)
        lengths_f [B]   int64   bag size of each row for feature f (1 for a scalar id)
        dense     [B, W] float32 the dense scalars then the vector features' columns (W may be 0)
        scenario  [B]   int64   scenario index
        probs     [B, T] float32 one probability per task
    tables (serving/tables.py: fp32 or int8) ──► pooled [B, F_s·D] ──the trained network──► logits

The network is the training model itself, unsharded and in eval mode (the STAR trunk with its rows
grouped by scenario, model/star.py StarTrunk.group_by_scenario): its FieldEmbedding reads the
pooled fields through a pooled lookup (FieldEmbedding.use_pooled_lookup) instead of the
EmbeddingBagCollection, which is dropped (its weights live in the tables module). So the export
runs the same forward code as training and evaluation, kernels included: where the C++ kernels
ran (model.kernels auto/cpp on CPU), the program calls the registered ops torch.ops.msrec.*.

The batch (from 1) and each values_f length (from 0) are dynamic dimensions.
"""
from __future__ import annotations

import torch
from torch import nn

from msrec_dist.batch import Batch
from msrec_dist.features import FeatureSpec
from msrec_dist.model.star import StarTrunk


class PooledSparse:
    """Stands in for the KJT inside the program: the pooled fields and the bag lengths, all the
    FieldEmbedding reads of it once a pooled lookup is set."""

    def __init__(self, pooled: torch.Tensor, lengths: torch.Tensor) -> None:
        self.pooled = pooled  # [B, F_s * D]
        self._lengths = lengths  # [F_s * B]

    def lengths(self) -> torch.Tensor:
        return self._lengths


def _read_pooled(sparse: PooledSparse) -> torch.Tensor:
    return sparse.pooled


class ServingModule(nn.Module):
    def __init__(self, model: nn.Module, tables: nn.Module, features: FeatureSpec) -> None:
        super().__init__()
        model.eval()
        model.embedding.ebc = None  # the tables module holds the weights now
        model.embedding.use_pooled_lookup(_read_pooled)
        for block in model.modules():
            if isinstance(block, StarTrunk):  # each row through its own scenario's weights only
                block.group_by_scenario = True
        self.model = model
        self.tables = tables
        self.num_sparse = len(features.kjt_keys)
        self.num_tasks = len(features.task_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        num = self.num_sparse
        values, lengths = list(inputs[0:2 * num:2]), list(inputs[1:2 * num:2])
        dense, scenario = inputs[2 * num], inputs[2 * num + 1]  # [B, W], [B]
        by_feature = torch.stack(lengths)  # [F_s, B]
        pooled = self.tables(values, by_feature)  # [B, F_s * D]
        batch = Batch(sparse=PooledSparse(pooled, by_feature.reshape(-1)), dense=dense,  # type: ignore[arg-type]
                      labels=dense.new_zeros(dense.size(0), self.num_tasks), scenario=scenario, rows=scenario)
        return torch.sigmoid(self.model(batch))  # [B, T]


def input_names(features: FeatureSpec) -> list[str]:
    """The program's inputs, in order."""
    return [f"{name}.{part}" for name in features.kjt_keys for part in ("values", "lengths")] + ["dense", "scenario"]


def batch_inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    """A reader Batch → the program's inputs (CPU tensors, int64 ids and lengths)."""
    kjt = batch.sparse
    values = torch.split(kjt.values().long(), kjt.length_per_key())
    lengths = kjt.lengths().long().view(len(kjt.keys()), -1)  # [F_s, B]
    out: list[torch.Tensor] = []
    for v, n in zip(values, lengths):
        out += [v, n]
    return (*out, batch.dense.float(), batch.scenario.long())


def example_inputs(features: FeatureSpec, batch_size: int = 4) -> tuple[torch.Tensor, ...]:
    """Inputs of `batch_size` rows with two ids per bag (export traces with these; both dynamic
    sizes differ from 0 and 1, which torch.export would specialize)."""
    gen = torch.Generator().manual_seed(0)
    out: list[torch.Tensor] = []
    for f in features.kjt_features():
        out += [torch.randint(0, f.num_embeddings, (2 * batch_size,), generator=gen),
                torch.full((batch_size,), 2, dtype=torch.int64)]
    dense = torch.rand(batch_size, features.dense_width, generator=gen)
    scenario = torch.arange(batch_size) % features.num_scenarios
    return (*out, dense, scenario)


def export_program(module: ServingModule, features: FeatureSpec) -> torch.export.ExportedProgram:
    """torch.export of the module: one batch dimension shared by the lengths, dense and scenario
    inputs (any size from 1), and each feature's values length (any size, 0 included)."""
    batch = torch.export.Dim("batch", min=1)
    shapes: list[dict] = []
    for name in features.kjt_keys:
        shapes += [{0: torch.export.Dim(f"n_{_symbol(name)}", min=0)}, {0: batch}]
    shapes += [{0: batch}, {0: batch}]
    with torch.no_grad():
        return torch.export.export(module, example_inputs(features), dynamic_shapes=(tuple(shapes),), strict=False)


def _symbol(name: str) -> str:
    """A feature name as a Python identifier (torch.export's Dim names must be)."""
    return "".join(c if c.isalnum() else "_" for c in name)
