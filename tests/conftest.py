"""Shared fixtures: a small synthetic data set and a factory for tiny hand-made Parquet files.

`synth_data` (package scope: one for all of tests/, sub-packages included): path to data.yaml of
a 20k-row, 4-shard synthetic set (+ 4k eval rows).
`tiny_cfg`: a DataConfig matching the files `make_parquet` writes.
`make_parquet(name, rows=8, overrides=None, drop=(), row_group_size=None, seed=0)`: writes a
valid tiny file (columns below, values derived from the row number), with columns replaced
(`overrides`: name → list / numpy array / pyarrow array) or removed (`drop`); returns its path.
  scenario int64 (0..2), click/convert int64, user_id int64 (<100), item_id int64 (<50),
  hist_item_ids list<int64> (<50, lengths cycle 0,1,2,3), price float32
"""
from __future__ import annotations

import os

# The Triton interpreter must be chosen before anything imports triton; kernel tests need it and
# every other test uses the PyTorch reference on CPU, so it is set for the whole test run.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msrec_dist.data.schema import DataConfig
from msrec_dist.data.synth import generate
from msrec_dist.typed_yaml import from_dict

TINY_CONFIG = {
    "train": [],
    "scenario": {"column": "scenario", "names": ["home", "search", "cart"]},
    "tasks": [{"name": "click", "column": "click"}, {"name": "convert", "column": "convert"}],
    "sparse": [
        {"name": "user_id", "table": "user", "num_embeddings": 100, "dim": 4},
        {"name": "item_id", "table": "item", "num_embeddings": 50, "dim": 4},
        {"name": "hist_item_ids", "table": "item", "num_embeddings": 50, "dim": 4, "pooling": "mean"},
    ],
    "dense": [{"name": "price"}],
}


@pytest.fixture(scope="package")  # tests/ is a package: this spans its sub-packages
def synth_data(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("synth")
    return generate(str(out), rows=20_000, shards=4, seed=0, eval_rows=4_000, users=2_000, items=1_000)


@pytest.fixture
def tiny_cfg() -> DataConfig:
    return from_dict(DataConfig, TINY_CONFIG, "tiny")


def tiny_columns(rows: int, seed: int = 0) -> dict[str, object]:
    r = np.arange(rows) + 1000 * seed
    lens = r % 4
    hist = [list((r[i] * 7 + np.arange(lens[i])) % 50) for i in range(rows)]
    return {
        "scenario": (r % 3).astype(np.int64),
        "click": (r % 2).astype(np.int64),
        "convert": ((r % 4) == 1).astype(np.int64),
        "user_id": (r % 100).astype(np.int64),
        "item_id": ((r * 3) % 50).astype(np.int64),
        "hist_item_ids": pa.array(hist, pa.list_(pa.int64())),
        "price": (r * 0.5).astype(np.float32),
    }


@pytest.fixture
def make_parquet(tmp_path):
    def make(name: str, rows: int = 8, overrides: dict | None = None, drop: tuple[str, ...] = (),
             row_group_size: int | None = None, seed: int = 0) -> str:
        cols = tiny_columns(rows, seed)
        cols.update(overrides or {})
        for col in drop:
            del cols[col]
        path = os.path.join(tmp_path, name)
        pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
        return path

    return make
