"""The data contract for your own data: a `val:` split, hashed ids (hash_buckets), vector features
(dense with dim): config errors name the key, hashing is stable across processes, vectors decode
and their bad values name file, column and row (in the reader and in the value scan), and a tiny
run trains on all of it."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from msrec_dist.data.hashing import hash_ids
from msrec_dist.data.reader import _RowReader, validate_files
from msrec_dist.data.scan import scan_splits
from msrec_dist.data.schema import DataError, load_data_config, validate_file_schema
from msrec_dist.typed_yaml import ConfigError

K = 6  # vector dim
D = 8  # field dim

DATA = {
    "train": "train/*.parquet",
    "eval": "eval.parquet",
    "val": ["val.parquet"],
    "scenario": {"column": "scenario", "names": ["home", "search"]},
    "tasks": [{"name": "click", "column": "click"}],
    "sparse": [
        {"name": "item_id", "table": "item", "num_embeddings": 50, "dim": D},
        {"name": "user", "table": "user", "hash_buckets": 97, "dim": D},  # raw string ids
        {"name": "tags", "table": "user", "hash_buckets": 97, "dim": D, "pooling": "mean"},  # list<string>
        {"name": "raw_ip", "table": "ip", "hash_buckets": 31, "dim": D},  # raw int64 ids past any vocabulary
    ],
    "dense": [{"name": "price"}, {"name": "text_emb", "dim": K}, {"name": "age"}],
}


def table(n: int, seed: int = 0, vec=None) -> pa.Table:
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(n, K)).astype(np.float32) if vec is None else vec
    return pa.table({
        "scenario": rng.integers(0, 2, n),
        "click": rng.integers(0, 2, n),
        "item_id": rng.integers(0, 50, n),
        "user": [f"u{int(i)}" for i in rng.integers(0, 400, n)],
        "tags": [[f"t{int(t)}" for t in rng.integers(0, 30, int(m))] for m in rng.integers(0, 4, n)],
        "raw_ip": rng.integers(-2**62, 2**62, n),
        "price": rng.random(n),
        "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), K),
        "age": rng.random(n),
    })


def write(tmp_path, data=None, splits=None) -> str:
    (tmp_path / "train").mkdir(exist_ok=True)
    splits = splits or {"train/a.parquet": table(300, 1), "eval.parquet": table(100, 2), "val.parquet": table(100, 3)}
    for name, t in splits.items():
        pq.write_table(t, tmp_path / name, row_group_size=64)
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(DATA if data is None else data))
    return str(path)


# --- config ---------------------------------------------------------------------------------


def test_val_split_and_feature_kinds_parse(tmp_path):
    cfg = load_data_config(write(tmp_path))
    assert cfg.val == [str(tmp_path / "val.parquet")] and cfg.eval == [str(tmp_path / "eval.parquet")]
    assert [t.num_embeddings for t in cfg.tables()] == [50, 97, 31]
    assert [f.name for f in cfg.dense_scalars()] == ["price", "age"]
    assert [f.name for f in cfg.dense_vectors()] == ["text_emb"] and cfg.dense_width == 2 + K


def test_val_is_optional_and_a_string_is_one_pattern(tmp_path):
    data = {k: v for k, v in DATA.items() if k != "val"}
    assert load_data_config(write(tmp_path, data)).val == []
    assert load_data_config(write(tmp_path, {**DATA, "val": "val.parquet"})).val == [str(tmp_path / "val.parquet")]
    with pytest.raises(ConfigError, match=r"val\[0\]: pattern 'nope/\*.parquet'"):
        load_data_config(write(tmp_path, {**DATA, "val": "nope/*.parquet"}))


@pytest.mark.parametrize("index, entry, key", [
    (1, {"name": "user", "table": "user", "hash_buckets": 0, "dim": D}, r"sparse\[1\]\.hash_buckets: must be > 0"),
    (1, {"name": "user", "table": "user", "hash_buckets": 97, "num_embeddings": 96, "dim": D},
     r"sparse\[1\]\.num_embeddings: 96 differs from hash_buckets 97"),
    (0, {"name": "item_id", "table": "item", "dim": D}, r"sparse\[0\]\.num_embeddings: must be > 0 \(or give hash_buckets"),
    (0, {"name": "item_id", "table": "item", "num_embeddings": 50}, r"sparse\[0\]\.dim: required"),
    (0, {"name": "item_id", "table": "item", "hash_buckets": "many", "dim": D}, r"sparse\[0\]\.hash_buckets"),
])
def test_sparse_config_errors_name_the_key(tmp_path, index, entry, key):
    sparse = list(DATA["sparse"])
    sparse[index] = entry
    with pytest.raises(ConfigError, match=key):
        load_data_config(write(tmp_path, {**DATA, "sparse": sparse}))


def test_hashed_table_shared_with_other_buckets_is_refused(tmp_path):
    sparse = list(DATA["sparse"])
    sparse[2] = {**sparse[2], "hash_buckets": 98}
    with pytest.raises(ConfigError, match=r"sparse\[2\].*share table 'user'"):
        load_data_config(write(tmp_path, {**DATA, "sparse": sparse}))


def test_vector_dim_error_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"dense\[1\]\.dim: must be > 0"):
        load_data_config(write(tmp_path, {**DATA, "dense": [{"name": "price"}, {"name": "text_emb", "dim": 0}]}))


@pytest.mark.parametrize("column, arrow_type, expected", [
    ("user", pa.float64(), "integer, string, list<integer> or list<string>"),
    ("item_id", pa.string(), "integer or list<integer>"),  # strings only for hashed features
    ("text_emb", pa.float32(), f"list<float> or fixed_size_list<float, {K}>"),
    ("text_emb", pa.list_(pa.float32(), K + 1), f"list<float> or fixed_size_list<float, {K}>"),
    ("text_emb", pa.list_(pa.string()), f"list<float> or fixed_size_list<float, {K}>"),
])
def test_schema_check_names_column_and_expected_type(tmp_path, column, arrow_type, expected):
    cfg = load_data_config(write(tmp_path))
    schema = table(1).schema
    schema = schema.set(schema.get_field_index(column), pa.field(column, arrow_type))
    with pytest.raises(DataError, match=rf"x.parquet: column '{column}' .* expected {expected}$"):
        validate_file_schema("x.parquet", cfg, schema)


def test_plain_list_vectors_and_large_string_ids_pass_the_schema_check(tmp_path):
    cfg = load_data_config(write(tmp_path))
    schema = table(1).schema
    for col, tp in (("text_emb", pa.list_(pa.float64())), ("user", pa.large_string()),
                    ("tags", pa.large_list(pa.int32()))):
        schema = schema.set(schema.get_field_index(col), pa.field(col, tp))
    validate_file_schema("x.parquet", cfg, schema)


# --- hashing --------------------------------------------------------------------------------

INTS = [0, 1, -1, 2**62, 123456789]
STRS = ["", "a", "user_42", "héllo"]
PROGRAM = ("import pyarrow as pa; from msrec_dist.data.hashing import hash_ids; "
           f"print(hash_ids(pa.array({INTS}), 1000).tolist(), hash_ids(pa.array({STRS}), 1000).tolist())")


def test_hash_is_pinned_and_the_same_in_a_fresh_process():
    """Pinned values: a change to the hash (seed, key, function) re-maps every trained table's ids."""
    ints, strs = hash_ids(pa.array(INTS), 1000).tolist(), hash_ids(pa.array(STRS), 1000).tolist()
    assert ints == [311, 147, 325, 428, 82]
    assert strs == [274, 138, 188, 277]
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, cwd=os.path.dirname(os.path.dirname(
                                 os.path.dirname(os.path.abspath(__file__))))).stdout
        assert out.strip() == f"{ints} {strs}"


def test_hash_does_not_depend_on_int_width_order_or_chunking():
    assert hash_ids(pa.array([5, -3], pa.int32()), 77).tolist() == hash_ids(pa.array([5, -3]), 77).tolist()
    vals = [f"s{i}" for i in range(50)]
    fwd = hash_ids(pa.array(vals), 1 << 20)
    rev = hash_ids(pa.array(vals[::-1]), 1 << 20)
    assert fwd.tolist() == rev[::-1].tolist()
    assert hash_ids(pa.array(vals).slice(10, 5), 1 << 20).tolist() == fwd[10:15].tolist()
    assert hash_ids(pa.array(vals, pa.large_string()), 1 << 20).tolist() == fwd.tolist()


@pytest.mark.parametrize("values", [np.arange(20_000), np.arange(20_000) * 1024,
                                    [f"user_{i}" for i in range(20_000)]], ids=["ints", "strided", "strings"])
def test_hash_spreads_over_buckets(values):
    rows = hash_ids(pa.array(values), 16)
    assert rows.dtype == np.int64 and rows.min() >= 0 and rows.max() < 16
    counts = np.bincount(rows, minlength=16)
    assert counts.min() > 0.85 * 20_000 / 16 and counts.max() < 1.15 * 20_000 / 16, counts


# --- decode ---------------------------------------------------------------------------------


def test_decode_hashes_ids_and_lays_out_vectors_after_scalars(tmp_path):
    t = table(100, 2)
    cfg = load_data_config(write(tmp_path))
    files = [str(tmp_path / "eval.parquet")]
    batch = _RowReader(cfg, validate_files(cfg, files)).read([(0, 64)])
    assert batch.dense.shape == (64, 2 + K)
    np.testing.assert_array_equal(batch.dense[:, 0].numpy(), t["price"].to_numpy()[:64].astype(np.float32))
    np.testing.assert_array_equal(batch.dense[:, 1].numpy(), t["age"].to_numpy()[:64].astype(np.float32))
    vec = np.stack(t["text_emb"].to_pylist()[:64]).astype(np.float32)
    np.testing.assert_array_equal(batch.dense[:, 2:].numpy(), vec)
    kjt = batch.sparse.to_dict()
    assert kjt["user"].values().tolist() == hash_ids(t["user"].combine_chunks().slice(0, 64), 97).tolist()
    tags = t["tags"].combine_chunks().slice(0, 64)
    assert kjt["tags"].lengths().tolist() == [len(x) for x in tags.to_pylist()]
    assert kjt["tags"].values().tolist() == hash_ids(tags.flatten(), 97).tolist()
    assert kjt["raw_ip"].values().max() < 31 and kjt["raw_ip"].values().min() >= 0


def bad_vectors(kind: str) -> pa.Array:
    rows = [[0.5] * K for _ in range(100)]
    if kind == "length":
        rows[70] = [0.5] * (K - 1)
    elif kind == "nan":
        rows[70][3] = float("nan")
    elif kind == "inf":
        rows[70][3] = float("inf")
    elif kind == "null_inside":
        rows[70][3] = None
    elif kind == "null_row":
        rows[70] = None
    return pa.array(rows, pa.list_(pa.float64()))


@pytest.mark.parametrize("kind, message", [
    ("length", f"vector of length {K - 1}, expected dim {K}"),
    ("nan", "vector element 3 is nan"),
    ("inf", "vector element 3 is inf"),
    ("null_inside", "null inside the vector \\(element 3\\)"),
    ("null_row", "null value"),
])
@pytest.mark.parametrize("split", ["train/a.parquet", "val.parquet"])
def test_bad_vector_is_caught_by_the_scan_naming_file_column_row(tmp_path, kind, message, split):
    t = table(100, 5)
    t = t.set_column(t.schema.get_field_index("text_emb"), "text_emb", bad_vectors(kind))
    splits = {"train/a.parquet": table(300, 1), "eval.parquet": table(100, 2), "val.parquet": table(100, 3),
              split: t}
    cfg = load_data_config(write(tmp_path, splits=splits))
    with pytest.raises(DataError, match=rf"{split}: column 'text_emb' row 70: {message}"):
        scan_splits(cfg, True)


def test_nan_in_fixed_size_list_vector_names_the_row(tmp_path):
    vec = np.zeros((100, K), np.float32)
    vec[41, 5] = np.nan
    cfg = load_data_config(write(tmp_path, splits={"train/a.parquet": table(300, 1), "eval.parquet": table(100, 2),
                                                   "val.parquet": table(100, 3, vec=vec)}))
    with pytest.raises(DataError, match=r"val.parquet: column 'text_emb' row 41: vector element 5 is nan"):
        scan_splits(cfg, True)


def test_null_hashed_id_names_the_row(tmp_path):
    t = table(100, 5)
    users = t["user"].to_pylist()
    users[12] = None
    t = t.set_column(t.schema.get_field_index("user"), "user", pa.array(users))
    cfg = load_data_config(write(tmp_path, splits={"train/a.parquet": table(300, 1), "eval.parquet": table(100, 2),
                                                   "val.parquet": t}))
    with pytest.raises(DataError, match=r"val.parquet: column 'user' row 12: null value"):
        scan_splits(cfg, True)


def test_unhashed_features_keep_the_range_check(tmp_path):
    t = table(100, 5)
    ids = t["item_id"].to_numpy().copy()
    ids[33] = 50
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(ids))
    cfg = load_data_config(write(tmp_path, splits={"train/a.parquet": table(300, 1), "eval.parquet": table(100, 2),
                                                   "val.parquet": t}))
    with pytest.raises(DataError, match=r"val.parquet: column 'item_id' row 33: id 50 outside 0..49"):
        scan_splits(cfg, True)


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["msrec_full", "ple"])  # msrec_full: attention over the field stack; ple: the folded first layer
def test_a_tiny_run_trains_on_hashed_ids_vectors_and_a_val_split(tmp_path, model):
    from msrec_dist.config import load_experiment
    from msrec_dist.distributed.context import init_distributed
    from msrec_dist.training import runner
    from tests.distributed.launch import REPO, TINY_MODEL

    data = write(tmp_path)
    cfg = load_experiment(os.path.join(REPO, f"configs/{model}.yaml"), data,
                          tuple(TINY_MODEL) + ("reader.batch_size=64", f"run.dir={tmp_path / 'run'}",
                                               "train.max_steps=3"))
    metrics = runner.run(cfg, init_distributed())
    assert metrics
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "step_3" / ".metadata")
