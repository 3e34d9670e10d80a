"""Reader: row accounting, bad-input errors, rank/worker splits, resume, KJT layout."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from msrec_dist.data.reader import (DataError, ReaderConfig, count_rows, make_dataloader, read_ahead_in_thread,
                                    validate_files)
from msrec_dist.data.schema import load_data_config


def _batches(cfg, files, batch_size, workers=0, split="interleave", rank=0, world=1, start=0, thread=True):
    """All batches; without workers, decoded in the read-ahead thread (`thread`) or inline."""
    reader = ReaderConfig(batch_size, workers, split, prefetch_factor=2, prefetch_thread=thread)
    dl = make_dataloader(cfg, files, reader, rank, world, start)
    out = list(dl)
    assert len(dl) == len(out)
    return out


def _rows(batches) -> np.ndarray:
    return np.concatenate([b.rows.numpy() for b in batches]) if batches else np.zeros(0, np.int64)


# ---------------------------------------------------------------- counts and contents
def test_row_counts_match_metadata(synth_data):
    cfg = load_data_config(synth_data)
    meta = [pq.ParquetFile(f).metadata.num_rows for f in cfg.train]
    assert count_rows(cfg.train) == sum(meta) == 20_000
    assert validate_files(cfg, cfg.train).rows == meta
    assert len(_rows(_batches(cfg, cfg.train, 1000))) == sum(meta)


def test_batch_contents_match_rows(synth_data):
    cfg = load_data_config(synth_data)
    table = pq.read_table(cfg.train)
    user, d2 = table["user_id"].to_numpy(), table["d2"].to_numpy()
    scen, click = table["scenario"].to_numpy(), table["click"].to_numpy()
    hist_len = np.diff(table["hist_item_ids"].combine_chunks().offsets.to_numpy())
    for rank in (0, 1):
        for b in _batches(cfg, cfg.train, 700, workers=2, rank=rank, world=2):
            r = b.rows.numpy()
            kjt = b.sparse.to_dict()
            assert np.array_equal(kjt["user_id"].values().numpy(), user[r])
            assert np.array_equal(kjt["hist_item_ids"].lengths().numpy(), hist_len[r])
            assert np.array_equal(b.dense[:, 2].numpy(), d2[r])
            assert np.array_equal(b.scenario.numpy(), scen[r])
            assert np.array_equal(b.labels[:, 0].numpy(), click[r].astype(np.float32))
            assert b.dense.dtype == b.labels.dtype == torch.float32 and b.scenario.dtype == torch.int64


def test_read_modes_yield_the_same_batches(synth_data):
    cfg = load_data_config(synth_data)
    runs = {mode: _batches(cfg, cfg.train, 700, world=2, rank=1, start=3, thread=mode)
            for mode in (True, False, "auto")}
    for mode in (False, "auto"):
        assert len(runs[mode]) == len(runs[True])
        for a, b in zip(runs[True], runs[mode]):
            assert torch.equal(a.rows, b.rows) and torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())


def test_auto_read_ahead_thread_only_with_cpu_time_for_it():
    # (setting, device, usable cores, step threads, world size) -> thread?
    assert read_ahead_in_thread("auto", "cpu", 2, 2, 1) is False  # 1 rank, OpenMP threads on both cores
    assert read_ahead_in_thread("auto", "cpu", 1, 1, 2) is True  # ranks wait for each other in collectives
    assert read_ahead_in_thread("auto", "cpu", 16, 8, 1) is True  # spare cores
    assert read_ahead_in_thread("auto", "cuda", 2, 2, 1) is True  # the host threads wait on the GPU
    assert read_ahead_in_thread(True, "cpu", 2, 2, 1) is True and read_ahead_in_thread(False, "cuda", 16, 1, 8) is False


def test_prefetch_thread_config_values():
    from msrec_dist.typed_yaml import ConfigError, from_dict

    for value in (True, False, "auto"):
        assert from_dict(ReaderConfig, {"prefetch_thread": value}).prefetch_thread == value
    assert ReaderConfig().prefetch_thread == "auto"
    with pytest.raises(ConfigError) as e:
        from_dict(ReaderConfig, {"prefetch_thread": "sometimes"}, "reader")
    assert "reader.prefetch_thread" in str(e.value) and "true/false" in str(e.value) and "'auto'" in str(e.value)


# ---------------------------------------------------------------- splits
@pytest.mark.parametrize("split", ["interleave", "files"])
@pytest.mark.parametrize("world", [1, 2])
def test_workers_and_ranks_disjoint_and_complete(synth_data, split, world):
    cfg = load_data_config(synth_data)
    rows = _rows([b for rank in range(world) for b in _batches(cfg, cfg.train, 600, 2, split, rank, world)])
    assert len(rows) == 20_000 and np.array_equal(np.sort(rows), np.arange(20_000))


def test_disjoint_complete_small_row_groups(tiny_cfg, make_parquet):
    files = [make_parquet(f"f{i}.parquet", rows=n, row_group_size=3, seed=i) for i, n in enumerate([7, 1, 11, 5, 4])]
    for split in ("interleave", "files"):
        rows = _rows([b for rank in range(2) for b in _batches(tiny_cfg, files, 3, 2, split, rank, 2)])
        assert np.array_equal(np.sort(rows), np.arange(28)), split


def test_interleave_world2_matches_world1(synth_data):
    cfg = load_data_config(synth_data)
    b = 768  # 20000 rows: last global batch of 2*768 has 32 rows, all on rank 0
    one = _batches(cfg, cfg.train, 2 * b, workers=2)
    r0 = _batches(cfg, cfg.train, b, workers=2, rank=0, world=2)
    r1 = _batches(cfg, cfg.train, b, workers=0, rank=1, world=2)
    assert len(one) == len(r0) == len(r1) + 1
    for k, full in enumerate(one):
        parts = [r0[k].rows] + ([r1[k].rows] if k < len(r1) else [])
        assert torch.equal(torch.cat(parts), full.rows)
        assert torch.equal(torch.cat([r0[k].labels] + ([r1[k].labels] if k < len(r1) else [])), full.labels)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_start_batch_resumes_exactly(synth_data, workers):
    cfg = load_data_config(synth_data)
    full = _batches(cfg, cfg.train, 1000, workers)
    resumed = _batches(cfg, cfg.train, 1000, workers, start=7)
    assert [b.rows.tolist() for b in resumed] == [b.rows.tolist() for b in full[7:]]
    # resume after a world-size change: world 2 from global batch 7 continues world 1's order
    r0 = _batches(cfg, cfg.train, 500, workers, rank=0, world=2, start=7)
    r1 = _batches(cfg, cfg.train, 500, workers, rank=1, world=2, start=7)
    assert [torch.cat([a.rows, c.rows]).tolist() for a, c in zip(r0, r1)] == [b.rows.tolist() for b in full[7:]]


def test_files_mode_start_batch_resumes(tiny_cfg, make_parquet):
    # parts of rank 0: files 0+4 (6 batches) and file 1 (1 batch), so worker 1 runs out early
    files = [make_parquet(f"f{i}.parquet", rows=n, row_group_size=4, seed=i) for i, n in enumerate([9, 2, 13, 6, 3])]
    for rank in range(2):
        full = _batches(tiny_cfg, files, 2, 2, "files", rank, 2)
        for start in (1, 2, 3, len(full) - 1, len(full)):
            resumed = _batches(tiny_cfg, files, 2, 2, "files", rank, 2, start)
            assert [b.rows.tolist() for b in resumed] == [b.rows.tolist() for b in full[start:]]


# ---------------------------------------------------------------- KJT layout
def test_kjt_lengths_and_values(tiny_cfg, make_parquet):
    hist_a = [[1, 2], [], [3], [4, 5, 6], []]
    hist_b = [[7], [], [8, 9], [10]]
    fa = make_parquet("a.parquet", rows=5, row_group_size=2, overrides={"hist_item_ids": hist_a})
    fb = make_parquet("b.parquet", rows=4, seed=1, overrides={"hist_item_ids": hist_b})
    users = pq.read_table([fa, fb])["user_id"].to_pylist()
    items = pq.read_table([fa, fb])["item_id"].to_pylist()
    hists = hist_a + hist_b
    batches = _batches(tiny_cfg, [fa, fb], 4)  # rows [0,4) [4,8) [8,9): the second spans both files
    assert [b.rows.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    for b in batches:
        r = b.rows.tolist()
        kjt = b.sparse
        assert kjt.keys() == ["user_id", "item_id", "hist_item_ids"]
        lens = [1] * len(r) + [1] * len(r) + [len(hists[i]) for i in r]  # feature-major [F * B]
        assert kjt.lengths().tolist() == lens
        vals = [users[i] for i in r] + [items[i] for i in r] + [v for i in r for v in hists[i]]
        assert kjt.values().tolist() == vals and kjt.values().dtype == torch.int64
        assert b.dense.shape == (len(r), 1) and b.labels.shape == (len(r), 2) and b.scenario.shape == (len(r),)


def test_accepts_other_integer_and_label_types(tiny_cfg, make_parquet):
    f = make_parquet("t.parquet", rows=4, overrides={
        "click": pa.array([True, False, True, False]), "convert": pa.array([1.0, 0.0, 0.0, 1.0]),
        "user_id": pa.array([1, 2, 3, 4], pa.int32()), "price": pa.array([1, 2, 3, 4], pa.int16()),
        "hist_item_ids": pa.array([[1], [], [2, 3], [4]], pa.large_list(pa.int32()))})
    (b,) = _batches(tiny_cfg, [f], 8)
    assert b.labels.tolist() == [[1, 1], [0, 0], [1, 0], [0, 1]]
    assert b.sparse["hist_item_ids"].values().tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------- bad inputs
def _nan_at(i, n=8):
    v = np.zeros(n)
    v[i] = np.nan
    return v


BAD_ROWS = {  # case → (overrides, column, file row)
    "id_negative": ({"user_id": [0, 1, 2, 3, 4, -1, 6, 7]}, "user_id", 5),
    "id_too_large": ({"item_id": [0, 1, 2, 3, 4, 5, 50, 7]}, "item_id", 6),
    "id_too_large_in_list": ({"hist_item_ids": [[1], [], [2, 3], [4], [], [5, 6], [7, 99, 8], [1]]},
                             "hist_item_ids", 6),
    "id_negative_in_list": ({"hist_item_ids": [[1], [-4], [2], [], [], [], [], []]}, "hist_item_ids", 1),
    "null_in_list": ({"hist_item_ids": [[1], [], [2], [], [3, None], [], [], []]}, "hist_item_ids", 4),
    "null_id": ({"user_id": pa.array([0, 1, 2, 3, None, 5, 6, 7], pa.int64())}, "user_id", 4),
    "scenario_out_of_range": ({"scenario": [0, 1, 2, 0, 1, 2, 3, 0]}, "scenario", 6),
    "nan_label": ({"click": _nan_at(5)}, "click", 5),
    "non_binary_label": ({"convert": [0, 1, 0, 1, 0, 1, 0, 2]}, "convert", 7),
    "nan_dense": ({"price": _nan_at(3).astype(np.float32)}, "price", 3),
    "inf_dense": ({"price": [0.0, 0.0, np.inf, 0.0, 0.0, 0.0, 0.0, 0.0]}, "price", 2),
    "dense_past_float32": ({"price": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1e39, 0.0]}, "price", 6),  # inf as float32
}


@pytest.mark.parametrize("workers, thread", [(0, True), (0, False), (1, True)], ids=["thread", "inline", "worker"])
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_values_name_file_column_row(tiny_cfg, make_parquet, case, workers, thread):
    overrides, column, row = BAD_ROWS[case]
    good = make_parquet("good.parquet", rows=5)
    bad = make_parquet(f"bad_{case}.parquet", overrides=overrides, row_group_size=3)
    children = set(multiprocessing.active_children())
    with pytest.raises(DataError) as e:
        _batches(tiny_cfg, [good, bad], 4, workers, thread=thread)
    msg = str(e.value)
    assert f"bad_{case}.parquet" in msg and f"'{column}'" in msg and f"row {row}:" in msg, msg
    # the workers are gone when the error arrives, not when the garbage collector gets to them
    assert set(multiprocessing.active_children()) <= children


@pytest.mark.parametrize("case, column", [("missing", "price"), ("wrong_dtype", "item_id")])
def test_schema_errors_before_training(tiny_cfg, make_parquet, case, column):
    kw = {"drop": ("price",)} if case == "missing" else {"overrides": {"item_id": [str(i) for i in range(8)]}}
    bad = make_parquet(f"{case}.parquet", **kw)
    with pytest.raises(DataError) as e:
        make_dataloader(tiny_cfg, [make_parquet("good.parquet"), bad], ReaderConfig(4, 0))
    assert f"{case}.parquet" in str(e.value) and f"'{column}'" in str(e.value)


@pytest.mark.parametrize("case", ["zero_rows", "zero_bytes", "not_parquet", "truncated"])
def test_empty_and_corrupt_files(tiny_cfg, make_parquet, tmp_path, case):
    good = make_parquet("good.parquet")
    path = str(tmp_path / f"{case}.parquet")
    if case == "zero_rows":
        pq.write_table(pq.read_table(good).slice(0, 0), path)
    elif case == "zero_bytes":
        open(path, "wb").close()
    elif case == "not_parquet":
        with open(path, "w") as f:
            f.write("user_id,item_id\n1,2\n")
    else:
        data = open(good, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        validate_files(tiny_cfg, [good, path])
    assert f"{case}.parquet" in str(e.value)
    if case.startswith("zero"):
        assert "empty shard" in str(e.value)
    assert os.path.exists(path)
