"""data.yaml parsing: the documented example, table sharing, key-path errors, path resolution."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from msrec_dist.data.schema import DataError, load_data_config, validate_file_schema
from msrec_dist.typed_yaml import ConfigError

EXAMPLE = """
train: data/train/*.parquet
eval: data/eval/*.parquet
scenario: {column: scenario, names: [home, search, cart]}
tasks:
  - {name: click, column: click}
  - {name: convert, column: convert}
sparse:
  - {name: user_id, table: user, num_embeddings: 100000, dim: 16}
  - {name: item_id, table: item, num_embeddings: 50000, dim: 16}
  - {name: hist_item_ids, table: item, num_embeddings: 50000, dim: 16, pooling: mean}
dense:
  - {name: price}
"""


@pytest.fixture
def layout(tmp_path):
    """tmp/cfg/data.yaml with files under tmp/cfg/data/{train,eval}; returns the yaml path."""
    for split, names in (("train", ["b.parquet", "a.parquet"]), ("eval", ["e.parquet"])):
        d = tmp_path / "cfg" / "data" / split
        d.mkdir(parents=True)
        for n in names:
            pq.write_table(pa.table({"x": [1]}), d / n)
    return _write(tmp_path / "cfg" / "data.yaml", yaml.safe_load(EXAMPLE))


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_example_parses(layout, tmp_path):
    cfg = load_data_config(layout)
    base = tmp_path / "cfg" / "data"
    assert cfg.train == [str(base / "train" / "a.parquet"), str(base / "train" / "b.parquet")]
    assert cfg.eval == [str(base / "eval" / "e.parquet")]
    assert cfg.num_scenarios == 3
    assert cfg.task_names == ["click", "convert"]
    assert cfg.sparse_names == ["user_id", "item_id", "hist_item_ids"]
    assert cfg.dense_names == ["price"]
    assert cfg.sparse[0].pooling == "sum" and cfg.sparse[2].pooling == "mean"
    tables = cfg.tables()
    assert [(t.name, t.num_embeddings, t.dim, t.feature_names) for t in tables] == [
        ("user", 100000, 16, ["user_id"]), ("item", 50000, 16, ["item_id", "hist_item_ids"])]


def test_relative_paths_resolve_against_yaml_dir(layout, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # cwd differs from the yaml's directory
    cfg = load_data_config(os.path.relpath(layout))
    assert all(os.path.isabs(f) and os.path.exists(f) for f in cfg.train + cfg.eval)


def test_list_of_patterns_and_plain_path(layout, tmp_path):
    data = yaml.safe_load(EXAMPLE)
    data["train"] = ["data/train/b.parquet", "data/train/*.parquet"]
    cfg = load_data_config(_write(tmp_path / "cfg" / "data.yaml", data))
    assert [os.path.basename(f) for f in cfg.train] == ["a.parquet", "b.parquet"]


def test_glob_matching_nothing_names_pattern(layout, tmp_path):
    data = yaml.safe_load(EXAMPLE)
    data["eval"] = "nowhere/*.parquet"
    with pytest.raises(ConfigError, match=r"nowhere/\*\.parquet"):
        load_data_config(_write(tmp_path / "cfg" / "data.yaml", data))


def test_shared_table_conflict_names_both_features(layout, tmp_path):
    data = yaml.safe_load(EXAMPLE)
    data["sparse"][2]["dim"] = 8
    with pytest.raises(ConfigError) as e:
        load_data_config(_write(tmp_path / "cfg" / "data.yaml", data))
    msg = str(e.value)
    assert "item_id" in msg and "hist_item_ids" in msg and "item" in msg and "data.yaml" in msg


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["sparse"][1].update(colour="red"), r"sparse\[1\].*colour"),
    (lambda d: d["sparse"][2].update(pooling="max"), r"sparse\[2\]\.pooling"),
    (lambda d: d["tasks"][0].pop("column"), r"tasks\[0\]\.column: required key missing"),
    (lambda d: d["scenario"].pop("names"), r"scenario\.names: required key missing"),
    (lambda d: d.update(extra=1), r"unknown key.*extra"),
    (lambda d: d["sparse"][0].update(num_embeddings="many"), r"sparse\[0\]\.num_embeddings"),
    (lambda d: d["sparse"][0].update(num_embeddings=0), r"sparse\[0\]\.num_embeddings"),
    (lambda d: d["dense"].append({"name": "price"}), r"dense: duplicate"),
])
def test_bad_keys_name_file_and_key_path(layout, tmp_path, edit, expected):
    data = yaml.safe_load(EXAMPLE)
    edit(data)
    with pytest.raises(ConfigError, match=expected) as e:
        load_data_config(_write(tmp_path / "cfg" / "data.yaml", data))
    assert "data.yaml" in str(e.value)


def test_validate_file_schema(tmp_path, tiny_cfg, make_parquet):
    validate_file_schema(make_parquet("ok.parquet"), tiny_cfg)
    path = make_parquet("bad.parquet", overrides={"hist_item_ids": pa.array([["a"]] * 8)})
    with pytest.raises(DataError, match=r"bad\.parquet.*'hist_item_ids'.*list<.*string>.*list<integer>"):
        validate_file_schema(path, tiny_cfg)
    path = make_parquet("miss.parquet", drop=("price",))
    with pytest.raises(DataError, match=r"miss\.parquet.*'price'.*missing"):
        validate_file_schema(path, tiny_cfg)
    path = make_parquet("lab.parquet", overrides={"click": pa.array(["1"] * 8)})
    with pytest.raises(DataError, match=r"lab\.parquet.*'click'.*string"):
        validate_file_schema(path, tiny_cfg)
    path = make_parquet("sc.parquet", overrides={"scenario": pa.array([0.0] * 8)})
    with pytest.raises(DataError, match=r"sc\.parquet.*'scenario'.*double.*integer"):
        validate_file_schema(path, tiny_cfg)


def test_kjt_keys_group_features_by_table():
    from tests.model.conftest import SPARSE_KEYS, make_data_config

    cfg = make_data_config()  # schema order item_id, user_id, hist_item_ids; item_id + hist share `item`
    assert cfg.sparse_names == ["item_id", "user_id", "hist_item_ids"]
    assert cfg.kjt_keys == ["item_id", "hist_item_ids", "user_id"] == SPARSE_KEYS
    assert [f.name for f in cfg.kjt_features()] == cfg.kjt_keys
    assert [t.feature_names for t in cfg.tables()] == [["item_id", "hist_item_ids"], ["user_id"]]


def test_data_config_is_the_shared_feature_spec_plus_files(layout):
    """DataConfig extends msrec_dist/features.py's FeatureSpec (what the model reads) with the
    files; schema.py re-exports the spec classes under their old names."""
    from msrec_dist import features
    from msrec_dist.data import schema

    cfg = load_data_config(layout)
    assert isinstance(cfg, features.FeatureSpec)
    assert cfg.kjt_keys == ["user_id", "item_id", "hist_item_ids"] and cfg.num_scenarios == 3
    for name in ("SparseFeature", "DenseFeature", "TaskSpec", "ScenarioSpec", "TableSpec"):
        assert getattr(schema, name) is getattr(features, name)


def test_table_init_resolves_against_the_yaml_dir_and_is_a_table_property(layout, tmp_path, monkeypatch):
    """`init` (pretrained vectors) on one feature of a shared table is the table's; its relative
    path resolves against the data.yaml's directory, whatever the working directory."""
    from msrec_dist.features import TableInit

    data = yaml.safe_load(EXAMPLE)
    data["sparse"][2]["init"] = {"path": "vectors/item.npy", "freeze": True}  # hist_item_ids: table item
    data["sparse"][0]["init"] = {"path": "~/user.parquet"}
    monkeypatch.chdir(tmp_path)
    cfg = load_data_config(os.path.relpath(_write(tmp_path / "cfg" / "init.yaml", data)))
    user, item = cfg.tables()
    assert item.init == TableInit(str(tmp_path / "cfg" / "vectors" / "item.npy"), freeze=True) and item.frozen
    assert user.init == TableInit(os.path.expanduser("~/user.parquet"), freeze=False) and not user.frozen
    assert cfg.frozen_tables() == {"item"}
    assert load_data_config(layout).frozen_tables() == set()  # no init: no table loaded or frozen


def test_table_init_given_twice_must_agree(layout, tmp_path):
    data = yaml.safe_load(EXAMPLE)
    data["sparse"][1]["init"] = {"path": "item.npy", "freeze": True}
    data["sparse"][2]["init"] = {"path": "item.npy", "freeze": True}  # the same again: fine
    assert load_data_config(_write(tmp_path / "cfg" / "data.yaml", data)).frozen_tables() == {"item"}
    data["sparse"][2]["init"] = {"path": "item.npy"}  # freeze differs
    with pytest.raises(ConfigError, match=r"data\.yaml: sparse\[2\]\.init: features 'item_id' \(sparse\[1\]\) and "
                                          r"'hist_item_ids' \(sparse\[2\]\) share table 'item' but give different init"):
        load_data_config(_write(tmp_path / "cfg" / "data.yaml", data))


@pytest.mark.parametrize("init, expected", [
    ({"path": "item.csv"}, r"sparse\[1\]\.init\.path: 'item\.csv' is neither \.npy nor \.parquet"),
    ({"path": ""}, r"sparse\[1\]\.init\.path: required"),
    ({"freeze": True}, r"sparse\[1\]\.init\.path: required key missing"),
    ({"path": "item.npy", "freeze": "yes"}, r"sparse\[1\]\.init\.freeze: expected true/false"),
    ({"path": "item.npy", "trainable": False}, r"sparse\[1\]\.init: unknown key.*trainable"),
])
def test_bad_table_init_names_the_key(layout, tmp_path, init, expected):
    data = yaml.safe_load(EXAMPLE)
    data["sparse"][1]["init"] = init
    with pytest.raises(ConfigError, match=expected):
        load_data_config(_write(tmp_path / "cfg" / "data.yaml", data))
