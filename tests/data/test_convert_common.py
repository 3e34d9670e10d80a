"""The converters' shared writing step (msrec_dist/data/convert/common.py): vocabularies built from
train only with OOV row 0 (ints, strings, list columns, sliced lists, a table shared by two
features), split_indices, read_lines / parse_int / read_csv errors naming file and line."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from msrec_dist.data.convert.common import (ConvertError, DatasetSpec, Sparse, build_vocab, map_ids, parse_int,
                                            read_csv, read_lines, split_indices, write_dataset)


def test_map_ids_lists_sliced_and_nulls():
    vocab = build_vocab([pa.array([9, 3, 5, 3])])
    assert vocab.to_pylist() == [3, 5, 9]
    lst = pa.array([[5, 3], [], None, [9, 5, 7]], pa.list_(pa.int64()))
    assert map_ids(lst, vocab).to_pylist() == [[2, 1], [], [], [3, 2, 0]]
    assert map_ids(lst.slice(1, 3), vocab).to_pylist() == [[], [], [3, 2, 0]]
    assert map_ids(pa.array([7, None, 9]), vocab).to_pylist() == [0, 0, 3]
    assert map_ids(pa.array(["b", "z"]), build_vocab([pa.array(["b", "a"])])).to_pylist() == [2, 0]


def test_split_indices_time_order_and_random():
    ts = np.array([50, 10, 40, 20, 30, 60, 70, 80, 90, 100])
    tr, va, ev = split_indices(10, (0.8, 0.1, 0.1), order=ts)
    assert ts[tr].max() <= ts[va].min() <= ts[ev].min() and (len(tr), len(va), len(ev)) == (8, 1, 1)
    a, b = split_indices(10, seed=1), split_indices(10, seed=1)
    assert all((x == y).all() for x, y in zip(a, b)) and sorted(np.concatenate(a)) == list(range(10))


def test_write_dataset_shared_table_and_oov(tmp_path):
    tr = {"scenario": [0, 1, 1], "click": [1, 0, 1], "item": [7, 3, 5],
          "hist": pa.array([[3], [], [5, 7]], pa.list_(pa.int64())), "price": [1.0, 2.0, 3.0]}
    ev = {"scenario": [1], "click": [0], "item": [11], "hist": pa.array([[7, 12]]), "price": [0.5]}
    spec = DatasetSpec(name="t", scenario_names=["a", "b"], tasks=["click"],
                       sparse=[Sparse("item"), Sparse("hist", "item", "mean")], dense=["price"], dim=4,
                       source="somewhere", protocol="- how", source_files=["raw.txt"])
    path = write_dataset({"train": tr, "val": ev, "eval": ev}, spec, str(tmp_path))
    cfg = yaml.safe_load(open(path))
    assert cfg["sparse"] == [{"name": "item", "table": "item", "num_embeddings": 4, "dim": 4, "oov_id": 0},
                             {"name": "hist", "table": "item", "num_embeddings": 4, "dim": 4, "oov_id": 0,
                              "pooling": "mean"}]
    assert pq.read_table(tmp_path / "vocab" / "item.parquet").to_pydict() == {"raw": [3, 5, 7], "index": [1, 2, 3]}
    e = pq.read_table(tmp_path / "eval").to_pydict()
    assert e["item"] == [0] and e["hist"] == [[3, 0]]
    t = pq.read_table(tmp_path / "train")
    assert t.schema.field("item").type == pa.int64() and t.schema.field("hist").type.value_type == pa.int64()
    readme = open(tmp_path / "README.md").read()
    assert "somewhere" in readme and "`raw.txt`" in readme and "| train | 1 | 2 | 3 |" in readme
    with pytest.raises(ValueError, match="val"):
        write_dataset({"train": tr, "eval": ev}, spec, str(tmp_path))


def test_reader_errors_name_file_and_line(tmp_path):
    p = tmp_path / "x.dat"
    p.write_text("1::2\n3::4\n5\n")
    with pytest.raises(ConvertError, match=r"x.dat: line 3: expected \[2\] fields"):
        read_lines(str(p), "::", 2)
    with pytest.raises(ConvertError, match=r"f.txt: line 4: column 'r' is not an integer: '2.5'"):
        parse_int(["1", "2", "2.5"], "f.txt", "r", first_line=2)
    c = tmp_path / "c.csv"
    c.write_text("a,b\n1,2\n3\n")
    with pytest.raises(ConvertError, match=r"c.csv: line 3: expected 2 fields"):
        read_csv(str(c))
    assert read_lines(str(p), "::", (1, 2))[0] == ["1", "3", "5"]
    assert os.path.exists(p)
