"""Batch prediction: a split's Parquet shards streamed through an exported program.

    DATA.yaml split ──reader (this rank's share, file order; ids checked against the exported
    tables)──► Batch ──batch_inputs──► model.pt2 ──► probs [B, T]
      ──► Parquet: row (the input's row id: its position in the split's sorted files), scenario,
          p_<task> per task; one file on one rank, DIR/part-r<rank>.parquet on several
      ──► with labels and `metrics`: the training run's per scenario × task table (AUC, logloss, n),
          over all ranks, printed and written to <out>.metrics.json

The data config gives the files and columns; the features must be the exported ones (names,
tables, dims, hashing). Each table's row count is the exported one, so an id beyond it is the
reader's DataError naming the file, the column (the feature) and the row, never a clamp. Files
without the label columns are scored without labels (then `metrics` is an error).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from msrec_dist.data.reader import make_dataloader
from msrec_dist.data.schema import DataConfig, DataError, ReaderConfig, load_data_config, open_parquet
from msrec_dist.features import FeatureSpec, SparseFeature
from msrec_dist.metrics.evaluator import ScenarioTaskMetrics, format_table
from msrec_dist.serving.export import MANIFEST, PROGRAM
from msrec_dist.serving.program import batch_inputs
from msrec_dist.typed_yaml import ConfigError, from_dict

ROWS_PER_GROUP = 65536  # rows buffered before a Parquet row group is written


def read_manifest(model_dir: str) -> dict:
    path = os.path.join(model_dir, MANIFEST)
    if not os.path.exists(path):
        raise ConfigError(f"{model_dir}: no {MANIFEST} (write one with python -m msrec_dist.export)")
    with open(path) as f:
        return json.load(f)


def load_program(model_dir: str, manifest: dict, kind: str = "auto") -> Callable[..., torch.Tensor]:
    """The program as a callable (registers the ops it calls first): `kind` aoti = the compiled
    package (model.aoti.pt2), export = model.pt2, auto = the package where the export has one
    and it loads on this machine (it is compiled for the exporting CPU), else model.pt2."""
    if any(op.startswith("fbgemm.") for op in manifest["ops"]):
        import fbgemm_gpu  # noqa: F401
    if any(op.startswith("msrec.") for op in manifest["ops"]):
        import msrec_dist.kernels  # noqa: F401  (the C++ ops and their fakes)
    compiled = manifest.get("compiled")
    if kind not in ("auto", "aoti", "export"):
        raise ConfigError(f"--program must be auto, aoti or export, got {kind!r}")
    if kind == "aoti" and not compiled:
        raise ConfigError(f"{model_dir}: exported without a compiled program (--no-compile); use --program export")
    if kind != "export" and compiled:
        try:
            return torch._inductor.aoti_load_package(os.path.join(model_dir, compiled["file"]))
        except Exception as e:  # noqa: BLE001  (auto: any failure to load falls back to model.pt2)
            if kind == "aoti":
                raise
            print(f"msrec-predict: {compiled['file']} did not load ({type(e).__name__}: {e}); using {PROGRAM}",
                  file=sys.stderr, flush=True)
    return torch.export.load(os.path.join(model_dir, PROGRAM)).module()


def reading_config(data: DataConfig, manifest: dict, with_labels: bool) -> DataConfig:
    """The data config to read with: its files and columns, the exported features and table
    sizes. A feature that differs from the exported one is a ConfigError naming it."""
    exported = from_dict(FeatureSpec, manifest["data"], "manifest.json: data")
    mine = {f.name: f for f in data.sparse}
    sparse: list[SparseFeature] = []
    for f in exported.sparse:
        g = mine.get(f.name)
        if g is None:
            raise ConfigError(f"the data config has no sparse feature '{f.name}', which the model was exported with")
        if (g.table, g.dim, g.hash_buckets, g.pooling) != (f.table, f.dim, f.hash_buckets, f.pooling):
            raise ConfigError(f"sparse feature '{f.name}': table/dim/hash_buckets/pooling "
                              f"{(g.table, g.dim, g.hash_buckets, g.pooling)} differ from the exported "
                              f"{(f.table, f.dim, f.hash_buckets, f.pooling)}")
        sparse.append(f)  # the exported table size: the reader rejects ids beyond it
    dense = [(d.name, d.dim) for d in data.dense]
    if dense != [(d.name, d.dim) for d in exported.dense]:
        raise ConfigError(f"dense features {dense} differ from the exported {[(d.name, d.dim) for d in exported.dense]}")
    if data.scenario.names != exported.scenario.names:
        raise ConfigError(f"scenario names {data.scenario.names} differ from the exported {exported.scenario.names}")
    if with_labels and [t.name for t in data.tasks] != exported.task_names:
        raise ConfigError(f"tasks {[t.name for t in data.tasks]} differ from the exported {exported.task_names}")
    return dataclasses.replace(data, sparse=sparse, dense=exported.dense,
                               tasks=data.tasks if with_labels else [])


def has_labels(data: DataConfig, files: list[str]) -> bool:
    names = set(open_parquet(files[0]).schema_arrow.names)
    return all(t.column in names for t in data.tasks)


def output_paths(out: str, rank: int, world_size: int) -> tuple[str, str]:
    """(this rank's Parquet file, the metrics JSON): `out` itself on one rank, else
    out/part-r<rank>.parquet."""
    if world_size == 1:
        return out, f"{out}.metrics.json"
    return os.path.join(out, f"part-r{rank:05d}.parquet"), os.path.join(out, "metrics.json")


def prepare_output(out: str, overwrite: bool, world_size: int) -> None:
    """Refuse to replace earlier predictions unless `overwrite` (then moved aside, not deleted)."""
    if os.path.exists(out):
        if not overwrite:
            raise ConfigError(f"{out} exists; pass --overwrite to move it aside and write there")
        aside = f"{out}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(out, aside)
        if os.path.exists(f"{out}.metrics.json"):
            os.replace(f"{out}.metrics.json", f"{aside}.metrics.json")
        print(f"moved the previous {out} to {aside}", file=sys.stderr, flush=True)
    if world_size > 1:
        os.makedirs(out)


class _PartWriter:
    """One rank's predictions, streamed into a Parquet file (written under .tmp, renamed at close)."""

    def __init__(self, path: str, tasks: list[str], meta: dict) -> None:
        self.path, self.tmp = path, f"{path}.tmp"
        fields = [pa.field("row", pa.int64()), pa.field("scenario", pa.int64())]
        fields += [pa.field(f"p_{t}", pa.float32()) for t in tasks]
        self.schema = pa.schema(fields, metadata={"msrec_dist": json.dumps(meta)})
        # zstd without dictionaries for the float columns: their dictionary encoding cost 4x the
        # rest of the write (50k rows: 10 ms against 2.5 ms) for a bigger file than zstd's
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd", compression_level=1,
                                       use_dictionary=["scenario"])
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.rows = 0

    def add(self, rows: torch.Tensor, scenario: torch.Tensor, probs: torch.Tensor) -> None:
        self.parts.append((rows.numpy(), scenario.numpy(), probs.numpy()))
        self.buffered += len(rows)
        if self.buffered >= ROWS_PER_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        rows, scenario, probs = (np.concatenate(p) for p in zip(*self.parts))
        cols = [pa.array(rows), pa.array(scenario)] + [pa.array(probs[:, t]) for t in range(probs.shape[1])]
        self.writer.write_table(pa.Table.from_arrays(cols, schema=self.schema))
        self.rows += len(rows)
        self.parts, self.buffered = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def logits_of(probs: torch.Tensor) -> torch.Tensor:
    """The metrics take logits; from the probabilities in float64, so sigmoid gives them back."""
    return torch.logit(probs.double())


@torch.no_grad()
def predict(model_dir: str, data_yaml: str, split: str, out: str, metrics: bool = False, batch_size: int = 4096,
            overwrite: bool = False, rank: int = 0, world_size: int = 1,
            program: Callable[..., torch.Tensor] | None = None, program_kind: str = "auto") -> dict:
    """Score the split; returns {rows, metrics (or None), out, load_s, score_s}. Collectives only
    where world_size > 1. `program`: the directory's program already loaded (load_program), to
    score several splits or files without loading it again; `program_kind`: see load_program."""
    manifest = read_manifest(model_dir)
    data = load_data_config(data_yaml)
    files = {"train": data.train, "val": data.val, "eval": data.eval}.get(split)
    if files is None:
        raise ConfigError(f"--split must be train, val or eval, got {split!r}")
    if not files:
        raise ConfigError(f"{data_yaml}: no {split} files")
    labelled = has_labels(data, files)
    if metrics and not labelled:
        raise ConfigError(f"--metrics needs the label columns {[t.column for t in data.tasks]}, "
                          f"which {files[0]} lacks")
    cfg = reading_config(data, manifest, metrics)  # the label columns are read only to score them
    t0 = time.perf_counter()
    program = load_program(model_dir, manifest, program_kind) if program is None else program
    load_s = time.perf_counter() - t0
    if rank == 0:
        prepare_output(out, overwrite, world_size)
    if world_size > 1:
        torch.distributed.barrier()
    path, metrics_path = output_paths(out, rank, world_size)
    meta = {"model": os.path.abspath(model_dir), "checkpoint_step": manifest["checkpoint"]["step"],
            "data": os.path.abspath(data_yaml), "split": split, "scenarios": manifest["scenarios"],
            "tasks": manifest["tasks"], "rank": rank, "world_size": world_size}
    writer = _PartWriter(path, manifest["tasks"], meta)
    cells = ScenarioTaskMetrics(cfg.scenario.names, cfg.task_names) if metrics else None
    reader = ReaderConfig(batch_size=batch_size, shuffle=False, scan=False, prefetch_thread=True)
    error = None
    t0 = time.perf_counter()
    try:
        for batch in make_dataloader(cfg, files, reader, rank, world_size):
            probs = program(*batch_inputs(batch))  # [B, T]
            writer.add(batch.rows, batch.scenario, probs)
            if cells is not None:
                cells.update(logits_of(probs), batch.labels, batch.scenario)
        writer.close()
    except (DataError, RuntimeError) as e:
        writer.abort()
        error = e
    score_s = time.perf_counter() - t0
    if world_size > 1:  # every rank learns whether one failed (no rank waits in the metrics' gather)
        failed = torch.tensor([error is not None], dtype=torch.long)
        torch.distributed.all_reduce(failed)
        if failed.item() and error is None:
            raise RuntimeError("prediction failed on another rank (its error is on its stderr)")
    if error is not None:
        raise error
    rows = writer.rows
    if world_size > 1:
        total = torch.tensor([rows], dtype=torch.long)
        torch.distributed.all_reduce(total)
        rows = int(total.item())
    result = {"out": out, "rows": rows, "metrics": cells.compute() if cells is not None else None,
              "load_s": load_s, "score_s": score_s}
    if rank == 0 and result["metrics"] is not None:
        tmp = f"{metrics_path}.tmp"
        with open(tmp, "w") as f:
            json.dump({**result["metrics"], "rows": rows, **meta}, f, indent=2)
        os.replace(tmp, metrics_path)
        print(format_table(result["metrics"]), flush=True)
    return result

