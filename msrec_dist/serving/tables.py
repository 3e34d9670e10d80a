"""The embedding tables of an exported model: sum-pooled lookups from plain tensors, fp32 or int8.

    values  per sparse feature f (KJT key order) [N_f] int64 ids, rows of the feature's table
    lengths [F_s, B] int64: bag sizes (flattened, the KJT's feature-major layout)
    ──lookup──► pooled [B, F_s * D], the features in KJT key order (what FieldEmbedding's pooled
                lookup returns)

Fp32Tables: every table stacked into one [R, D] weight, feature f reading rows base_f.. through
aten's embedding_bag (sum): a program that needs only torch to load.
Int8Tables: fbgemm's inference table-batched kernel (IntNBitTableBatchedEmbeddingBagsCodegen's
op, torchrec's quantized EBC's too) over row-wise int8 rows (D bytes + fp16 scale and bias:
D + 4 bytes a row against 4·D in fp32, 3.2× smaller at D = 16, 3.56× at D = 32). The op is
called directly on the module's buffers: the fbgemm module holds TorchScript objects (its cache
counters) that torch.export cannot trace.

Both check every id against its table's rows inside the program (an assertion naming the
feature): with the tables stacked an id past its table would read the next table's rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bag_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[N] bag lengths → [N + 1] offsets (0, cumsum)."""
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


class _Tables(nn.Module):
    """What both kinds share: the feature → table map, the id checks, the output layout."""

    def __init__(self, table_rows: list[int], dim: int, feature_tables: list[int], feature_names: list[str]) -> None:
        super().__init__()
        self.dim = dim
        self.table_rows = list(table_rows)
        self.feature_tables = list(feature_tables)
        self.feature_names = list(feature_names)

    def check_ids(self, values: list[torch.Tensor]) -> None:
        for name, table, ids in zip(self.feature_names, self.feature_tables, values):
            rows = self.table_rows[table]
            # one reduction per feature; _assert_async stays in the exported graph and raises there
            torch._assert_async(((ids >= 0) & (ids < rows)).all(),
                                f"feature '{name}': an id outside 0..{rows - 1}, the rows of its exported table")

    @property
    def fp32_bytes(self) -> int:
        return sum(self.table_rows) * self.dim * 4


class Fp32Tables(_Tables):
    def __init__(self, weights: list[torch.Tensor], feature_tables: list[int], feature_names: list[str]) -> None:
        super().__init__([w.size(0) for w in weights], weights[0].size(1), feature_tables, feature_names)
        self.register_buffer("weight", torch.cat([w.detach().float() for w in weights]).contiguous())  # [R, D]
        starts = [0]
        for w in weights[:-1]:
            starts.append(starts[-1] + w.size(0))
        self.bases = [starts[t] for t in feature_tables]  # first row of each feature's table

    @property
    def table_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, values: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        self.check_ids(values)
        ids = torch.cat([v + base if base else v for v, base in zip(values, self.bases)])  # [N]
        num_features, batch = lengths.shape
        pooled = F.embedding_bag(ids, self.weight, bag_offsets(lengths.reshape(-1)), mode="sum",
                                 include_last_offset=True)  # [F_s * B, D]
        # sizes from the [F_s, B] lengths, not inferred (-1): the export then keeps any batch size, 1 too
        return pooled.view(num_features, batch, self.dim).transpose(0, 1).reshape(batch, num_features * self.dim)


class Int8Tables(_Tables):
    def __init__(self, weights: list[torch.Tensor], feature_tables: list[int], feature_names: list[str]) -> None:
        super().__init__([w.size(0) for w in weights], weights[0].size(1), feature_tables, feature_names)
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

        tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(f"t{i}", w.size(0), w.size(1), SparseType.INT8, EmbeddingLocation.HOST)
                             for i, w in enumerate(weights)],
            feature_table_map=list(feature_tables), pooling_mode=PoolingMode.SUM, device="cpu",
            output_dtype=SparseType.FP32)
        tbe.initialize_weights()
        for w, (rows, scale_bias) in zip(weights, tbe.split_embedding_weights(split_scale_shifts=True)):
            # fbgemm's row-wise quantizer: [N, D] uint8 then fp16 scale and bias per row ([N, D + 4])
            q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w.detach().float().contiguous(), 8)
            rows.copy_(q[:, :self.dim])
            scale_bias.copy_(q[:, self.dim:])
        for name in ("weights_host", "weights_offsets", "weights_placements", "weights_tys", "D_offsets"):
            self.register_buffer(name, getattr(tbe, name).clone())
        self.register_buffer("empty_uvm", tbe.weights_uvm.clone(), persistent=False)
        self.register_buffer("empty_cache", tbe.lxu_cache_weights.clone(), persistent=False)
        self.register_buffer("empty_locations", torch.empty(0, dtype=torch.int32), persistent=False)
        self.total_d, self.max_int8_d, self.row_alignment = tbe.total_D, tbe.max_int8_D, tbe.row_alignment

    @property
    def table_bytes(self) -> int:
        return self.weights_host.numel() * self.weights_host.element_size()

    def forward(self, values: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        self.check_ids(values)
        return torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function(
            dev_weights=self.weights_host, uvm_weights=self.empty_uvm, weights_placements=self.weights_placements,
            weights_offsets=self.weights_offsets, weights_tys=self.weights_tys, D_offsets=self.D_offsets,
            total_D=self.total_d, max_int2_D=0, max_int4_D=0, max_int8_D=self.max_int8_d, max_float16_D=0,
            max_float32_D=0, indices=torch.cat(values), offsets=bag_offsets(lengths.reshape(-1)), pooling_mode=0,
            indice_weights=None, output_dtype=0, lxu_cache_weights=self.empty_cache,
            lxu_cache_locations=self.empty_locations, row_alignment=self.row_alignment, max_float8_D=0,
            fp8_exponent_bits=-1, fp8_exponent_bias=-1)  # [B, F_s * D] fp32 (output_dtype 0)
