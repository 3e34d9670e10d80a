"""reader.shuffle: a seeded per-epoch order (row groups permuted, then windows of shuffle_buffer
rows), every row once per epoch over ranks and workers, resumable at start_batch, eval unshuffled."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from msrec_dist.data.reader import ReaderConfig, make_dataloader
from msrec_dist.data.schema import load_data_config


def _batches(cfg, files, batch_size, epoch=0, seed=0, workers=0, split="interleave", rank=0, world=1, start=0,
             buffer=3000, shuffle=True):
    reader = ReaderConfig(batch_size=batch_size, num_workers=workers, split=split, prefetch_factor=2,
                          prefetch_thread=False, shuffle=shuffle, shuffle_buffer=buffer)
    dl = make_dataloader(cfg, files, reader, rank, world, start, epoch=epoch, seed=seed)
    out = list(dl)
    assert len(dl) == len(out)
    return out


def _order(batches) -> list[int]:
    return [r for b in batches for r in b.rows.tolist()]


@pytest.fixture
def small_groups(tiny_cfg, make_parquet):
    """5 files, 28 rows, row groups of 3 (and shorter ones at each file's end)."""
    return tiny_cfg, [make_parquet(f"f{i}.parquet", rows=n, row_group_size=3, seed=i)
                      for i, n in enumerate([7, 1, 11, 5, 4])]


@pytest.mark.parametrize("buffer", [3000, 65536])  # windows (straddled by batches); one window
def test_every_row_once_per_epoch_in_a_new_order(synth_data, buffer):
    cfg = load_data_config(synth_data)
    orders = {(e, s): _order(_batches(cfg, cfg.train, 700, epoch=e, seed=s, buffer=buffer))
              for e, s in ((0, 0), (1, 0), (0, 1))}
    for order in orders.values():
        assert sorted(order) == list(range(20_000))
        assert order != list(range(20_000))
    assert orders[0, 0] != orders[1, 0] and orders[0, 0] != orders[0, 1]
    assert _order(_batches(cfg, cfg.train, 700, epoch=0, seed=0, buffer=buffer)) == orders[0, 0]  # deterministic


def test_rows_mix_across_row_groups(small_groups):
    cfg, files = small_groups
    for buffer in (0, 10):  # 0: row groups only
        orders = [_order(_batches(cfg, files, 4, epoch=e, buffer=buffer)) for e in (3, 4)]
        assert sorted(orders[0]) == sorted(orders[1]) == list(range(28))
        assert orders[0] != orders[1] and orders[0] != list(range(28))
    # windows of 10 rows over permuted row groups of 3: a batch of 4 holds rows of several row groups
    batches = _batches(cfg, files, 4, epoch=3, buffer=10)
    groups = [{r // 3 for r in b.rows.tolist()} for b in batches]
    assert max(len(g) for g in groups) >= 3


def test_shuffled_batch_contents_match_rows(synth_data):
    cfg = load_data_config(synth_data)
    table = pq.read_table(cfg.train)
    user, d2 = table["user_id"].to_numpy(), table["d2"].to_numpy()
    scen, click = table["scenario"].to_numpy(), table["click"].to_numpy()
    hist = table["hist_item_ids"].combine_chunks()
    hist_off, hist_vals = hist.offsets.to_numpy(), hist.values.to_numpy()
    for b in _batches(cfg, cfg.train, 700, epoch=2, buffer=3000)[:8]:
        r = b.rows.numpy()
        assert len(np.unique(r)) == len(r)
        kjt = b.sparse.to_dict()
        assert np.array_equal(kjt["user_id"].values().numpy(), user[r])
        assert np.array_equal(kjt["hist_item_ids"].lengths().numpy(), np.diff(hist_off)[r])
        want = np.concatenate([hist_vals[hist_off[i]:hist_off[i + 1]] for i in r])
        assert np.array_equal(kjt["hist_item_ids"].values().numpy(), want)
        assert np.array_equal(b.dense[:, 2].numpy(), d2[r])
        assert np.array_equal(b.scenario.numpy(), scen[r])
        assert np.array_equal(b.labels[:, 0].numpy(), click[r].astype(np.float32))


def test_eval_and_unshuffled_read_in_file_order(synth_data):
    cfg = load_data_config(synth_data)
    assert _order(_batches(cfg, cfg.train, 700, epoch=None)) == list(range(20_000))  # eval / val: no epoch
    assert _order(_batches(cfg, cfg.train, 700, epoch=1, shuffle=False)) == list(range(20_000))
    assert ReaderConfig().shuffle is True


@pytest.mark.parametrize("buffer", [0, 3000])
def test_start_batch_resumes_the_same_order(synth_data, buffer):
    cfg = load_data_config(synth_data)
    full = _batches(cfg, cfg.train, 1000, epoch=1, buffer=buffer)
    resumed = _batches(cfg, cfg.train, 1000, epoch=1, buffer=buffer, start=7)
    assert [b.rows.tolist() for b in resumed] == [b.rows.tolist() for b in full[7:]]
    # world 2 from global batch 7: each global batch's rows are world 1's
    r0 = _batches(cfg, cfg.train, 500, epoch=1, buffer=buffer, rank=0, world=2, start=7)
    r1 = _batches(cfg, cfg.train, 500, epoch=1, buffer=buffer, rank=1, world=2, start=7)
    assert len(r0) == len(r1) == len(full) - 7
    for a, c, b in zip(r0, r1, full[7:]):
        assert torch.equal(torch.cat([a.rows, c.rows]), b.rows) and torch.equal(torch.cat([a.labels, c.labels]), b.labels)


def test_two_workers_two_ranks_every_row_once(synth_data):
    cfg = load_data_config(synth_data)
    one = _batches(cfg, cfg.train, 600, epoch=4, buffer=3000)
    two = _batches(cfg, cfg.train, 600, epoch=4, buffer=3000, workers=2)
    assert [b.rows.tolist() for b in two] == [b.rows.tolist() for b in one]  # same order, workers or not
    rows = _order([b for rank in range(2) for b in _batches(cfg, cfg.train, 300, epoch=4, buffer=3000, workers=2,
                                                            rank=rank, world=2)])
    assert sorted(rows) == list(range(20_000))


def test_files_split_shuffled_once_and_resumable(small_groups):
    cfg, files = small_groups
    for buffer in (0, 5):
        by_epoch = []
        for epoch in (0, 1):
            rows = _order([b for rank in range(2) for b in _batches(cfg, files, 2, epoch, 0, 2, "files", rank, 2,
                                                                   buffer=buffer)])
            assert sorted(rows) == list(range(28)), buffer
            by_epoch.append(rows)
        assert by_epoch[0] != by_epoch[1]
        for rank in range(2):  # same world size and workers: exact, as unshuffled
            full = _batches(cfg, files, 2, 1, 0, 2, "files", rank, 2, buffer=buffer)
            for start in (1, 3, len(full) - 1):
                resumed = _batches(cfg, files, 2, 1, 0, 2, "files", rank, 2, start, buffer=buffer)
                assert [b.rows.tolist() for b in resumed] == [b.rows.tolist() for b in full[start:]]


def test_shuffle_buffer_must_be_non_negative():
    from msrec_dist.typed_yaml import ConfigError

    with pytest.raises(ConfigError, match="shuffle_buffer"):
        ReaderConfig(shuffle_buffer=-1).validate("reader")
