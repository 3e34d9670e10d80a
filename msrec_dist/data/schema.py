"""Data config (data.yaml) and Parquet schema checks.

Flow: data.yaml → `load_data_config` (strict typed_yaml parse, globs resolved relative to the
yaml into sorted absolute file lists) → `DataConfig`: the feature specs (a FeatureSpec,
msrec_dist/features.py: which columns to read and how, sparse/dense/labels/scenario, and the
embedding tables the model builds from them) plus the train, eval and (optional) val files.
`validate_file_schema` checks one file's arrow schema against the config from metadata only,
before any row is read; failures are `DataError`s.

The yaml key names below are a contract shared with configs and other engineers.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Literal, Union

import pyarrow as pa
import pyarrow.parquet as pq

# The feature specs live in msrec_dist/features.py (the model reads them too); re-exported here.
from msrec_dist.features import DenseFeature, FeatureSpec, ScenarioSpec, SparseFeature, TableSpec, TaskSpec
from msrec_dist.typed_yaml import ConfigError, from_dict, load_yaml

__all__ = ["DataConfig", "DataError", "DenseFeature", "FeatureSpec", "ReaderConfig", "ScenarioSpec", "SparseFeature",
           "TableSpec", "TaskSpec", "load_data_config", "open_parquet", "resolve_paths", "validate_file_schema"]


class DataError(ValueError):
    """Bad input data; the message names the file, and where known the column and row."""


@dataclass(kw_only=True)
class DataConfig(FeatureSpec):
    """The features (msrec_dist/features.py: scenario, tasks, sparse, dense) and the data files."""

    train: list[str]  # after load_data_config: sorted absolute Parquet paths
    eval: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)  # optional third split (model selection); [] when absent


def resolve_paths(patterns: str | list[str], base_dir: str, where: str) -> list[str]:
    """Patterns (paths, globs or directories; relative to `base_dir`) → sorted absolute files."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: set[str] = set()
    for i, pat in enumerate(patterns):
        full = os.path.abspath(os.path.join(base_dir, os.path.expanduser(pat)))
        if os.path.isdir(full):
            full = os.path.join(full, "*.parquet")
        matches = [m for m in glob.glob(full) if os.path.isfile(m)] if glob.has_magic(full) else (
            [full] if os.path.isfile(full) else [])
        if not matches:
            raise ConfigError(f"{where}[{i}]: pattern {pat!r} (resolved to {full!r}) matches no file")
        files.update(os.path.abspath(m) for m in matches)
    return sorted(files)


def load_data_config(path: str) -> DataConfig:
    """Parse data.yaml strictly; train/eval/val globs and the tables' `init.path` (pretrained
    vectors) resolve relative to the yaml's directory."""
    raw = load_yaml(path)
    for key in ("train", "eval", "val"):
        if isinstance(raw.get(key), str):
            raw[key] = [raw[key]]
    try:
        cfg = from_dict(DataConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {str(e).removeprefix(': ')}") from e
    base = os.path.dirname(os.path.abspath(path))
    cfg.train = resolve_paths(cfg.train, base, f"{path}: train")
    cfg.eval = resolve_paths(cfg.eval, base, f"{path}: eval") if cfg.eval else []
    cfg.val = resolve_paths(cfg.val, base, f"{path}: val") if cfg.val else []
    for f in cfg.sparse:
        # checked when the table is built (distributed/pretrained.py), not here: a config read
        # without training (export, predict) needs no vectors file
        if f.init is not None:
            f.init.path = os.path.abspath(os.path.join(base, os.path.expanduser(f.init.path)))
    return cfg


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_int(t.value_type)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_hashable(t: pa.DataType) -> bool:  # a hashed feature: int or string ids, scalar or list
    return _is_int(t) or _is_str(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t))
                                        and (_is_int(t.value_type) or _is_str(t.value_type)))


def _vector_check(dim: int):
    def ok(t: pa.DataType) -> bool:
        return (_is_list(t) and _is_dense(t.value_type)
                and (not pa.types.is_fixed_size_list(t) or t.list_size == dim))
    return ok


def _is_label(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_dense(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def validate_file_schema(path: str, cfg: DataConfig, schema: pa.Schema | None = None) -> None:
    """Check that `path` has every needed column with a usable type (metadata only)."""
    if schema is None:
        schema = open_parquet(path).schema_arrow
    checks = [(cfg.scenario.column, "scenario", "integer", _is_int)]
    checks += [(t.column, f"label of task '{t.name}'", "integer, float or bool", _is_label) for t in cfg.tasks]
    checks += [(f.name, "sparse feature", "integer or list<integer>", lambda t: _is_int(t) or _is_int_list(t))
               if f.hash_buckets is None else
               (f.name, "hashed sparse feature", "integer, string, list<integer> or list<string>", _is_hashable)
               for f in cfg.sparse]
    checks += [(f.name, "dense feature", "float or integer", _is_dense) if f.dim is None else
               (f.name, f"vector feature (dim {f.dim})", f"list<float> or fixed_size_list<float, {f.dim}>",
                _vector_check(f.dim))
               for f in cfg.dense]
    for col, role, expected, ok in checks:
        idx = schema.get_field_index(col)
        if idx < 0:
            raise DataError(f"{path}: column '{col}' ({role}) is missing; file has {schema.names}")
        found = schema.field(idx).type
        if not ok(found):
            raise DataError(f"{path}: column '{col}' ({role}) has type {found}, expected {expected}")


def open_parquet(path: str) -> pq.ParquetFile:
    """Open a Parquet file, turning empty/corrupt files into DataErrors naming the file."""
    try:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty shard (0-byte file)")
        # pre_buffer: one read per row group's column chunks instead of one per page (2.9 -> 2.5 ms
        # per 16384-row group with the reader's single-threaded decoding; see data/reader.py)
        return pq.ParquetFile(path, pre_buffer=True)
    except DataError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet file: {e}") from e


@dataclass
class ReaderConfig:
    """How the reader (data/reader.py) streams the data; defined here, away from torch, so that
    configs load before torch does (train.py picks the OpenMP wait policy from num_workers)."""
    batch_size: int = 1024  # local (per-rank) batch
    num_workers: int = 0  # in-process: on few cores, worker IPC costs more than reading (benchmarks/results/reader_throughput.md)
    split: Literal["interleave", "files"] = "interleave"
    prefetch_factor: int = 4  # batches read ahead (per worker, or by the read-ahead thread)
    # with num_workers 0: decode in a background thread, overlapped with the step. auto: only where
    # the thread gets CPU time of its own: GPU step, spare cores, or several ranks (reader.read_ahead_in_thread)
    prefetch_thread: Union[bool, Literal["auto"]] = "auto"
    # true: check every value of the train, eval and val files before the first step (data/scan.py;
    # cost against one epoch's read: benchmarks/results/reader_scan.md); false: skip it for huge
    # data (the reader still checks each row group when it decodes it, mid-run)
    scan: bool = True
    # training order (data/reader.py): each epoch's rows in an order seeded by (run.seed, epoch), the
    # row groups permuted, then each window of shuffle_buffer rows of that order; exactly once per
    # epoch over ranks and workers, resumable mid-epoch. Eval and val always read in file order.
    shuffle: bool = True
    shuffle_buffer: int = 65536  # rows (a worker holds the window's decoded row groups); 0 or 1: row groups only

    def validate(self, where: str = "") -> None:
        for key, low in (("batch_size", 1), ("num_workers", 0), ("prefetch_factor", 1), ("shuffle_buffer", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"{where + '.' if where else ''}{key}: must be >= {low}, got {getattr(self, key)}")
