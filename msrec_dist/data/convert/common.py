"""Shared writing step of the converters: raw columns + a `DatasetSpec` → a ready data set.

    write_dataset(splits, spec, out_dir) → OUT_DIR/data.yaml
      splits   {"train": cols, "val": cols, "eval": cols}; cols = a pyarrow Table or a dict of
               column name → numpy array / pyarrow array / list. Sparse columns hold RAW ids (int or
               str, or list<int>/list<str> for a bag); the scenario column is already 0..S-1 and
               label columns already 0/1.
      writes   OUT_DIR/{train,val,eval}/part-*.parquet   (sparse columns as int64 / list<int64>)
               OUT_DIR/vocab/<table>.parquet              (columns raw, index; one row per train id)
               OUT_DIR/data.yaml                          (train:, val:, eval:, scenario, tasks, ...)
               OUT_DIR/README.md                          (source, protocol, files, rows per split × scenario)

Vocabulary (per table, from the TRAIN split only, over every feature sharing the table): the
distinct raw ids, sorted, map to 1..n; index 0 is the out-of-vocabulary row, for ids seen only in
val/eval (and for nulls). num_embeddings = n + 1. The vocab files hold only the n known ids.

Helpers for the format readers: `read_csv` (pyarrow.csv, single-char delimiter) and `read_lines`
(line-based split, any separator such as '::'), both with a clear error naming the file and the
line; `parse_int` (a column of strings → int64 with the same kind of error);
`split_indices` (time-order or random 8:1:1-style split). `ConvertError` is the error they raise.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

__all__ = ["ConvertError", "DatasetSpec", "Sparse", "SPLITS", "OOV_INDEX", "read_csv", "read_lines", "parse_int",
           "split_indices", "write_dataset", "build_vocab", "map_ids"]

SPLITS = ("train", "val", "eval")
OOV_INDEX = 0  # the row every id unseen in train maps to; known ids are 1..n


class ConvertError(ValueError):
    """Bad raw input; the message names the file and, where known, the line."""


@dataclass
class Sparse:
    """One sparse feature: `name` is the column (raw ids), `table` the embedding table it uses."""

    name: str
    table: str | None = None  # None: a table of its own, named like the column
    pooling: str = "sum"  # for list columns: sum or mean

    @property
    def table_name(self) -> str:
        return self.table or self.name


@dataclass
class DatasetSpec:
    """What the written data set holds and how the README describes it."""

    name: str  # e.g. "movielens-100k"
    scenario_names: list[str]
    tasks: list[str]  # label column names (task name = column name)
    sparse: list[Sparse]
    dense: list[str] = field(default_factory=list)
    scenario_column: str = "scenario"
    dim: int = 16  # embedding dim of every table
    source: str = ""  # README: where the raw files are obtained (nothing is downloaded)
    protocol: str = ""  # README: scenarios, labels, split, features (markdown)
    source_files: list[str] = field(default_factory=list)  # README: the raw files read
    command: str = ""  # README: the command that made it
    shards: int = 1  # Parquet files per split
    row_group_size: int = 16384


# ----------------------------------------------------------------------------------------------
# reading helpers


def read_lines(path: str, sep: str, ncols: int | Sequence[int], encoding: str = "latin-1",
               skip_header: bool = False) -> list[list[str]]:
    """Split every non-empty line of `path` on `sep` (any length); returns one list of strings per
    column. A line with a field count not in `ncols` raises ConvertError naming file and line."""
    allowed = {ncols} if isinstance(ncols, int) else set(ncols)
    width = max(allowed)
    rows: list[list[str]] = []
    with open(path, encoding=encoding, newline="") as f:
        for lineno, line in enumerate(f, 1):
            if skip_header and lineno == 1:
                continue
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split(sep)
            if len(parts) not in allowed:
                raise ConvertError(f"{path}: line {lineno}: expected {sorted(allowed)} fields separated by "
                                   f"{sep!r}, got {len(parts)}: {line[:200]!r}")
            rows.append(parts + [""] * (width - len(parts)))
    return [list(c) for c in zip(*rows)] if rows else [[] for _ in range(width)]


def read_csv(path: str, delimiter: str = ",", column_names: Sequence[str] | None = None,
             encoding: str = "utf8", quoting: bool = True, string_columns: Iterable[str] = ()) -> pa.Table:
    """pyarrow.csv read of `path` (single-char `delimiter`; header row unless `column_names`).
    Row i of the result is line i + 1 (+ 1 with a header) of the file: empty lines are errors,
    not skipped. A row with the wrong field count raises ConvertError naming file and line; a
    conversion failure names file and column (read those columns as `string_columns` and use
    `parse_int` for a line number)."""
    from pyarrow import csv as pacsv

    bad: list = []

    def on_invalid(row) -> str:
        bad.append(row)
        return "error"

    ropts = pacsv.ReadOptions(use_threads=False, encoding=encoding, column_names=column_names)
    popts = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False,
                               ignore_empty_lines=False, invalid_row_handler=on_invalid)
    copts = pacsv.ConvertOptions(column_types={c: pa.string() for c in string_columns})
    try:
        return pacsv.read_csv(path, read_options=ropts, parse_options=popts, convert_options=copts)
    except pa.ArrowInvalid as e:
        if bad:
            r = bad[0]
            raise ConvertError(f"{path}: line {r.number}: expected {r.expected_columns} fields separated by "
                               f"{delimiter!r}, got {r.actual_columns}: {r.text[:200]!r}") from None
        raise ConvertError(f"{path}: {e}") from None


def parse_int(values: Sequence[str], path: str, column: str, line_numbers: Sequence[int] | None = None,
              first_line: int = 1) -> np.ndarray:
    """Strings → int64 (vectorised); a non-integer raises ConvertError naming file, line and column.
    Line of value i: line_numbers[i] if given, else first_line + i."""
    arr = pa.array(values, pa.string())
    try:
        return pc.cast(pc.utf8_trim_whitespace(arr), pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        for i, v in enumerate(values):
            try:
                int(str(v).strip())
            except ValueError:
                line = line_numbers[i] if line_numbers is not None else first_line + i
                raise ConvertError(f"{path}: line {line}: column '{column}' is not an integer: {v!r}") from None
        raise


def split_indices(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), order: np.ndarray | None = None,
                  seed: int | None = None) -> list[np.ndarray]:
    """Row indices of each part. `order` given (e.g. timestamps): rows sorted by it (stable), cut
    in that order (earliest → train, latest → last part). Else a random permutation with `seed`."""
    if order is not None:
        perm = np.argsort(np.asarray(order), kind="stable")
    else:
        perm = np.random.default_rng(seed).permutation(n)
    cuts = np.floor(np.cumsum(np.asarray(fractions, np.float64)) / sum(fractions) * n + 1e-9).astype(np.int64)
    cuts[-1] = n
    return list(np.split(perm, cuts[:-1]))


# ----------------------------------------------------------------------------------------------
# vocabulary


def _values(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Flat values of an id column (list → its items)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return col.flatten()
    return col


def build_vocab(columns: Iterable[pa.Array | pa.ChunkedArray]) -> pa.Array:
    """Sorted distinct non-null raw ids over the given (train) columns."""
    vals = [_values(c) for c in columns]
    typ = vals[0].type
    merged = pa.concat_arrays([v.cast(typ) for v in vals])
    uniq = pc.unique(pc.drop_null(merged))
    return pc.take(uniq, pc.sort_indices(uniq))


def map_ids(col: pa.Array | pa.ChunkedArray, vocab: pa.Array) -> pa.Array:
    """Raw ids → 1..n by position in `vocab`; unseen ids and nulls → OOV_INDEX (0). Keeps list shape."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    flat = col.flatten() if is_list else col
    pos = pc.index_in(flat.cast(vocab.type), value_set=vocab)
    idx = pc.fill_null(pc.add(pos.cast(pa.int64()), 1), OOV_INDEX)
    if not is_list:
        return idx
    if col.null_count:
        col = pc.fill_null(col, pa.scalar([], col.type))
    offsets = col.offsets  # a sliced array's offsets start past 0; flatten() returned only its values
    offsets = pc.subtract(offsets.cast(pa.int64()), offsets[0].as_py())
    return pa.ListArray.from_arrays(offsets.cast(pa.int32()), idx)


# ----------------------------------------------------------------------------------------------
# writing


def _as_table(cols) -> pa.Table:
    if isinstance(cols, pa.Table):
        return cols
    return pa.table({k: v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v) for k, v in cols.items()})


def _write_split(table: pa.Table, out_dir: str, shards: int, row_group_size: int) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "part-*.parquet")):
        os.remove(old)
    shards = max(1, min(shards, table.num_rows)) if table.num_rows else 1
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(np.int64)
    paths = []
    for k in range(shards):
        path = os.path.join(out_dir, f"part-{k:05d}.parquet")
        pq.write_table(table.slice(int(bounds[k]), int(bounds[k + 1] - bounds[k])), path,
                       row_group_size=row_group_size)
        paths.append(path)
    return paths


def data_yaml(spec: DatasetSpec, sizes: dict[str, int]) -> dict:
    """The data config dict; sizes: table → num_embeddings (n + 1)."""
    sparse = []
    for f in spec.sparse:
        entry = {"name": f.name, "table": f.table_name, "num_embeddings": int(sizes[f.table_name]), "dim": spec.dim,
                 "oov_id": OOV_INDEX}
        if f.pooling != "sum":
            entry["pooling"] = f.pooling
        sparse.append(entry)
    return {
        "train": "train/*.parquet",
        "val": "val/*.parquet",
        "eval": "eval/*.parquet",
        "scenario": {"column": spec.scenario_column, "names": list(spec.scenario_names)},
        "tasks": [{"name": t, "column": t} for t in spec.tasks],
        "sparse": sparse,
        "dense": [{"name": d} for d in spec.dense],
    }


def _readme(spec: DatasetSpec, counts: dict[str, np.ndarray], positives: dict[str, dict[str, int]],
            sizes: dict[str, int]) -> str:
    s = spec.scenario_names
    lines = [f"# {spec.name}", "", "Written by `msrec_dist.data.convert`; nothing was downloaded.", ""]
    if spec.command:
        lines += ["## Command", "", "```", spec.command, "```", ""]
    lines += ["## Source", "", spec.source or "(not given)", ""]
    if spec.source_files:
        lines += ["Raw files read:", ""] + [f"- `{p}`" for p in spec.source_files] + [""]
    if spec.protocol:
        lines += ["## Protocol", "", spec.protocol.strip(), ""]
    lines += ["## Rows per split × scenario", "", "| split | " + " | ".join(s) + " | total |",
              "|---" * (len(s) + 2) + "|"]
    for split in SPLITS:
        c = counts[split]
        lines.append(f"| {split} | " + " | ".join(str(int(x)) for x in c) + f" | {int(c.sum())} |")
    lines += ["", "## Positive labels per split", "", "| split | " + " | ".join(spec.tasks) + " |",
              "|---" * (len(spec.tasks) + 1) + "|"]
    for split in SPLITS:
        lines.append(f"| {split} | " + " | ".join(str(positives[split][t]) for t in spec.tasks) + " |")
    lines += ["", "## Vocabularies", "",
              "Per table, built from the train split only: the distinct raw ids, sorted, map to 1..n "
              f"(`vocab/<table>.parquet`, columns `raw`, `index`); index {OOV_INDEX} is the out-of-vocabulary "
              "row for ids seen only in val/eval. num_embeddings = n + 1.", "",
              "| table | features | num_embeddings |", "|---|---|---|"]
    for table, size in sizes.items():
        feats = ", ".join(f.name for f in spec.sparse if f.table_name == table)
        lines.append(f"| {table} | {feats} | {size} |")
    lines += ["", "Files: `data.yaml` (splits `train`, `val`, `eval`), `train/`, `val/`, `eval/`, `vocab/`.", ""]
    return "\n".join(lines)


def write_dataset(splits: dict[str, object], spec: DatasetSpec, out_dir: str) -> str:
    """Map raw ids through train-built vocabularies, write shards, vocab files, data.yaml and
    README.md under `out_dir`; return the data.yaml path. `splits` needs keys train, val, eval."""
    missing = [k for k in SPLITS if k not in splits]
    if missing:
        raise ValueError(f"write_dataset: splits {missing} missing (need {list(SPLITS)})")
    tables = {k: _as_table(splits[k]) for k in SPLITS}
    if tables["train"].num_rows == 0:
        raise ConvertError(f"{spec.name}: the train split is empty")
    needed = [spec.scenario_column, *spec.tasks, *(f.name for f in spec.sparse), *spec.dense]
    for k, t in tables.items():
        absent = [c for c in needed if c not in t.column_names]
        if absent:
            raise ValueError(f"write_dataset: split '{k}' lacks columns {absent}")
    by_table: dict[str, list[str]] = {}
    for f in spec.sparse:
        by_table.setdefault(f.table_name, []).append(f.name)
    os.makedirs(os.path.join(out_dir, "vocab"), exist_ok=True)
    vocabs, sizes = {}, {}
    for table, names in by_table.items():
        vocab = build_vocab([tables["train"].column(n) for n in names])
        vocabs[table], sizes[table] = vocab, len(vocab) + 1
        pq.write_table(pa.table({"raw": vocab, "index": pa.array(np.arange(1, len(vocab) + 1), pa.int64())}),
                       os.path.join(out_dir, "vocab", f"{table}.parquet"))
    counts, positives = {}, {}
    S = len(spec.scenario_names)
    for split, t in tables.items():
        cols: dict[str, pa.Array] = {}
        scen = pc.cast(t.column(spec.scenario_column), pa.int64()).combine_chunks()
        sv = scen.to_numpy(zero_copy_only=False)
        if len(sv) and (sv.min() < 0 or sv.max() >= S):
            raise ValueError(f"write_dataset: split '{split}' has scenario values outside 0..{S - 1}")
        cols[spec.scenario_column] = scen
        for task in spec.tasks:
            cols[task] = pc.cast(t.column(task), pa.int64()).combine_chunks()
        for f in spec.sparse:
            cols[f.name] = map_ids(t.column(f.name), vocabs[f.table_name])
        for d in spec.dense:
            cols[d] = pc.cast(t.column(d), pa.float32()).combine_chunks()
        _write_split(pa.table(cols), os.path.join(out_dir, split), spec.shards, spec.row_group_size)
        counts[split] = np.bincount(sv, minlength=S) if len(sv) else np.zeros(S, np.int64)
        positives[split] = {task: int(pc.sum(cols[task]).as_py() or 0) for task in spec.tasks}
    path = os.path.join(out_dir, "data.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data_yaml(spec, sizes), f, sort_keys=False)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_readme(spec, counts, positives, sizes))
    return path
