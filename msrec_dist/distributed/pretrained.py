"""Pretrained tables: vectors read from a file into a (possibly sharded) table, and frozen tables.

    data.yaml  sparse[i].init: {path, freeze}  (msrec_dist/features.py TableInit; a table property)
      ──read_vectors (every rank, before the planner: a bad file fails before any sharding)──►
        float32 [rows, dim] in table row order, checked: shape, nulls, finite values
      ──copy_into_shards_, after init_embeddings──► each local shard's rows × cols of it
        (row_wise, table_wise, column_wise: ShardedTensor local shards and their offsets;
        data_parallel: the whole replicated tensor)

    freeze: true  ──no in-backward optimizer (model_parallel.build_train_state), so the sharder
                    groups the frozen tables into batched kernels of their own (its grouping key
                    holds the optimizer)──►
                  freeze_kernels: those kernels' weights requires_grad False and their output
                    cut from them, so no backward reaches them (no .grad, no fused update, weights
                    bitwise as loaded);
                    torchrec's DDP around a replicated lookup wrapped anew over what still trains
                  without_frozen: the frozen kernels' (stateless) fused optimizers left out of
                    the train state's optimizer: no optimizer state in checkpoints

File formats (docs/pretrained_vectors.md): .npy, a float array [rows, dim]; .parquet, a `vector`
column (list<float> or fixed_size_list<float, dim>) with one row per table row, in row order, or
with an `index` column (integer) naming each vector's row (every row exactly once).
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from msrec_dist.data.schema import DataError
from msrec_dist.features import FeatureSpec, TableSpec

VECTOR_COLUMN = "vector"
INDEX_COLUMN = "index"


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


CHECK_ROWS = 65536  # rows checked at a time: an mmap'd .npy is never read whole into memory


def _check_finite(path: str, vectors: np.ndarray, what: str) -> None:
    for start in range(0, vectors.shape[0], CHECK_ROWS):
        ok = np.isfinite(vectors[start: start + CHECK_ROWS]).all(axis=1)  # [block rows]
        if not ok.all():
            row = start + _first(~ok)
            raise DataError(f"{path}: {what} row {row} is not finite: {vectors[row].tolist()[:8]}")


def _read_npy(path: str, rows: int, dim: int, table: str) -> np.ndarray:
    try:
        # mmap: only the checks and the local shards' rows are read into memory
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot read the vectors of table '{table}' as .npy: {e}") from e
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path}: expected a float array [rows, dim] = [{rows}, {dim}] for table '{table}', "
                        f"got {array.dtype} of shape {list(array.shape)}")
    if array.shape != (rows, dim):
        raise DataError(f"{path}: table '{table}' expects {rows} rows x dim {dim}, got {array.shape[0]} rows x "
                        f"dim {array.shape[1]}")
    _check_finite(path, array, "vector")
    return array if array.dtype == np.float32 else array.astype(np.float32)


def _is_vector(t: pa.DataType) -> bool:
    return ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and pa.types.is_floating(t.value_type))


def _read_parquet(path: str, rows: int, dim: int, table: str) -> np.ndarray:
    try:
        schema = pq.read_schema(path)
        has_index = INDEX_COLUMN in schema.names
        if VECTOR_COLUMN not in schema.names:
            raise DataError(f"{path}: column '{VECTOR_COLUMN}' (the vectors of table '{table}') is missing; "
                            f"file has {schema.names}")
        found = schema.field(VECTOR_COLUMN).type
        if not _is_vector(found):
            raise DataError(f"{path}: column '{VECTOR_COLUMN}' has type {found}, expected list<float> or "
                            f"fixed_size_list<float, {dim}>")
        if has_index and not pa.types.is_integer(schema.field(INDEX_COLUMN).type):
            raise DataError(f"{path}: column '{INDEX_COLUMN}' has type {schema.field(INDEX_COLUMN).type}, "
                            "expected an integer (the table row of each vector)")
        t = pq.read_table(path, columns=[VECTOR_COLUMN, INDEX_COLUMN] if has_index else [VECTOR_COLUMN])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read the vectors of table '{table}' as Parquet: {e}") from e
    if t.num_rows != rows:
        raise DataError(f"{path}: table '{table}' expects {rows} rows (one vector per row), got {t.num_rows} rows")
    col = t.column(VECTOR_COLUMN).combine_chunks()
    if col.null_count:
        raise DataError(f"{path}: column '{VECTOR_COLUMN}' row {_first(col.is_null().to_numpy(zero_copy_only=False))} "
                        "is null")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)  # [rows]
    if (lengths != dim).any():
        row = _first(lengths != dim)
        raise DataError(f"{path}: column '{VECTOR_COLUMN}' row {row} has {lengths[row]} values, table '{table}' "
                        f"expects dim {dim}")
    values = col.flatten()  # honours the list offsets: rows x dim values
    if values.null_count:
        row = _first(values.is_null().to_numpy(zero_copy_only=False)) // dim
        raise DataError(f"{path}: column '{VECTOR_COLUMN}' row {row} has a null value")
    vectors = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(rows, dim)
    _check_finite(path, vectors, f"column '{VECTOR_COLUMN}'")
    if not has_index:
        return vectors
    index = t.column(INDEX_COLUMN).combine_chunks()
    if index.null_count:
        raise DataError(f"{path}: column '{INDEX_COLUMN}' row {_first(index.is_null().to_numpy(zero_copy_only=False))} "
                        "is null")
    index = index.to_numpy().astype(np.int64, copy=False)  # [rows]
    bad = (index < 0) | (index >= rows)
    if bad.any():
        row = _first(bad)
        raise DataError(f"{path}: column '{INDEX_COLUMN}' row {row}: {index[row]} outside 0..{rows - 1} "
                        f"(table '{table}' rows)")
    counts = np.bincount(index, minlength=rows)  # [rows]: how often each table row is given
    if (counts != 1).any():  # rows == file rows, all in range: a repeat leaves some row out
        table_row = _first(counts > 1)
        first, second = np.flatnonzero(index == table_row)[:2]
        raise DataError(f"{path}: column '{INDEX_COLUMN}' rows {first} and {second} both give table row "
                        f"{table_row}; each row must appear exactly once")
    out = np.empty_like(vectors)
    out[index] = vectors
    return out


def read_vectors(path: str, rows: int, dim: int, table: str) -> np.ndarray:
    """The table's pretrained rows [rows, dim] (float32) from `path` (.npy or .parquet), checked:
    row count, dim, nulls, finite values; errors name the file, column and row."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: vectors file of table '{table}' not found")
    if path.endswith(".npy"):
        return _read_npy(path, rows, dim, table)
    if path.endswith(".parquet"):
        return _read_parquet(path, rows, dim, table)
    raise DataError(f"{path}: vectors file of table '{table}' must end in .npy or .parquet")


def read_table_vectors(data: FeatureSpec) -> dict[str, np.ndarray]:
    """{table: vectors [rows, dim]} for every table with `init`."""
    return {t.name: read_vectors(t.init.path, t.num_embeddings, t.dim, t.name) for t in data.tables() if t.init}


@torch.no_grad()
def copy_into_shards_(value, vectors: np.ndarray) -> None:
    """Write the rows × cols of `vectors` [rows, dim] that each local shard of `value` holds: a
    ShardedTensor (anything with local_shards() whose shards have .tensor and
    .metadata.shard_offsets [row0, col0]: row_wise, table_wise, column_wise) or a whole tensor
    (a replicated table)."""
    shards = value.local_shards() if hasattr(value, "local_shards") else None
    pieces = [(s.tensor, *s.metadata.shard_offsets) for s in shards] if shards is not None else [(value, 0, 0)]
    for tensor, row0, col0 in pieces:
        rows, cols = tensor.shape
        block = vectors[row0: row0 + rows, col0: col0 + cols]
        if block.shape != (rows, cols):
            raise ValueError(f"shard at offsets [{row0}, {col0}] of size [{rows}, {cols}] lies outside the "
                             f"vectors [{vectors.shape[0]}, {vectors.shape[1]}]")
        tensor.copy_(torch.from_numpy(np.array(block, dtype=np.float32)))  # a copy: the .npy is a read-only mmap


_TABLE_KEY = re.compile(r"(?:^|\.)embedding_bags\.([^.]+)\.weight$")


def key_table(key: str) -> str:
    """The table of an EBC weight key ("[...].embedding_bags.<table>.weight"), else ""."""
    m = _TABLE_KEY.search(key)
    return m.group(1) if m else ""


def load_vectors(state_dict: dict, tables: list[TableSpec], vectors: dict[str, np.ndarray]) -> list[str]:
    """Copy each table's `vectors` into its entry of the sharded model's `state_dict` (views of the
    tables' weights); returns the tables written, in order."""
    dims = {t.name: (t.num_embeddings, t.dim) for t in tables}
    done = []
    for key, value in state_dict.items():
        name = key_table(key)
        if name not in vectors:
            continue
        if tuple(value.size()) != dims[name]:
            raise ValueError(f"table '{name}': the model's weight is {list(value.size())}, the config's "
                             f"{list(dims[name])}")
        copy_into_shards_(value, vectors[name])
        done.append(name)
    missing = sorted(set(vectors) - set(done))
    if missing:
        raise RuntimeError(f"pretrained table(s) {missing} not found in the model's state_dict")
    return done


def _lookup_kernels(lookup: nn.Module) -> list[nn.Module]:
    return list(getattr(lookup, "_emb_modules", []))


def freeze_kernels(module: nn.Module, frozen: set[str]) -> set[str]:
    """Turn the gradient off for the batched kernels of the `frozen` tables in the sharded module;
    returns the frozen tables found (those this rank holds a shard of: a table_wise table lives on
    one rank only).

    Each such kernel holds frozen tables only (they had no in-backward optimizer, and the sharder
    groups tables by optimizer); its fbgemm weights (and fused kernels' placeholder, the tensor that
    makes autograd call their backward) get requires_grad False, so its pooled output needs no
    gradient and backward never runs it. A replicated lookup that torchrec wrapped in DDP is
    wrapped anew (DDP keeps the parameters it saw at construction), or left bare when nothing of
    it trains any more. The kernels' outputs still require a gradient (_stop_gradient), for
    torchrec's collectives."""
    found: set[str] = set()
    for m in module.modules():
        lookups = getattr(m, "_lookups", None)
        if not isinstance(lookups, (list, nn.ModuleList)):
            continue
        for i, lookup in enumerate(lookups):
            inner = lookup.module if isinstance(lookup, DistributedDataParallel) else lookup
            changed = False
            for kernel in _lookup_kernels(inner):
                names = {t.name for t in kernel.config.embedding_tables}
                if not names & frozen:
                    continue
                if not names <= frozen:
                    raise RuntimeError(f"a batched kernel holds frozen tables {sorted(names & frozen)} with "
                                       f"trained ones {sorted(names - frozen)}; they cannot be frozen apart")
                # the registered tensors themselves: the kernel's named_parameters() yields table
                # views, whose requires_grad follows these
                for sub in kernel.modules():
                    for p in sub._parameters.values():
                        if p is not None:
                            p.requires_grad_(False)
                kernel.register_forward_hook(_stop_gradient)
                found |= names
                changed = True
                _register_frozen_views(m, kernel)
            if changed and isinstance(lookup, DistributedDataParallel):
                lookups[i] = _rewrap(lookup)
    return found


def _stop_gradient(kernel: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """A frozen kernel's pooled output [B, F_k * D] as a leaf that requires a gradient. torchrec's
    all-to-alls need every rank's lookup output to require one (an empty rank's is a dummy that
    does) so that the backward collectives run on every rank alike: without this, the rank holding
    a frozen table_wise table skipped the backward all-to-all the others waited in. The gradient
    ends at this leaf, a [B, F_k * D] tensor dropped with the graph, and never reaches the kernel."""
    return output.detach().requires_grad_() if torch.is_grad_enabled() else output


def _register_frozen_views(sharded: nn.Module, kernel: nn.Module) -> None:
    """Fresh table views of a frozen kernel, registered as the sharded module's
    `embedding_bags.<table>.weight`: the views torchrec made were taken while the kernel's weights
    still required a gradient and keep saying so (a view's flag is fixed when it is made). Dense
    (replicated) kernels cache their views; fused ones make them anew on each call."""
    cached = kernel.__dict__.get("_param_per_table")
    if isinstance(cached, dict):
        kernel._param_per_table = {
            name: TableBatchedEmbeddingSlice(v._original_tensor, v._start_offset, v._end_offset, v._num_embeddings,
                                             v._embedding_dim) if isinstance(v, TableBatchedEmbeddingSlice) else v
            for name, v in cached.items()}
    bags = getattr(sharded, "embedding_bags", None)
    if bags is None:
        return
    for name, view in kernel.named_parameters_by_table():
        if name in bags:
            bags[name].register_parameter("weight", view)


def _rewrap(ddp: DistributedDataParallel) -> nn.Module:
    """torchrec's DDP around a replicated lookup, built again over the parameters that still need a
    gradient (the same arguments torchrec's ShardedEmbeddingBagCollection uses), or the bare lookup."""
    ddp._remove_autograd_hooks()  # its reducer would still wait for the frozen weights' gradients
    inner = ddp.module
    if not any(p.requires_grad for p in inner.parameters()):
        return inner
    return DistributedDataParallel(inner, device_ids=ddp.device_ids, process_group=ddp.process_group,
                                   gradient_as_bucket_view=True, broadcast_buffers=True, static_graph=True)


def without_frozen(optimizer: KeyedOptimizer, frozen: set[str]) -> Optional[KeyedOptimizer]:
    """`optimizer` (DMP's fused optimizer: CombinedOptimizers of one optimizer per batched kernel)
    without the kernels' optimizers whose tables are all frozen (they never step: no backward
    reaches them); None when nothing is left. Keys stay as they were, so the trained tables' state
    has the same checkpoint keys with or without frozen tables."""
    if not frozen:
        return optimizer
    if isinstance(optimizer, CombinedOptimizer):
        kept = [(key, sub) for key, o in optimizer.optimizers if (sub := without_frozen(o, frozen)) is not None]
        return CombinedOptimizer(kept) if kept else None
    tables = {key_table(k) for k in optimizer.params}
    if not tables & frozen:
        return optimizer
    if not tables <= frozen:
        raise RuntimeError(f"one optimizer holds frozen tables {sorted(tables & frozen)} with trained ones "
                           f"{sorted(tables - frozen)}")
    return None
