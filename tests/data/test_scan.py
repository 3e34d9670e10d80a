"""The value scan before the first step (data/scan.py, `reader.scan`): a bad value anywhere in the
train or eval split stops the run before any step, naming the file, the column and the row; with
the scan off the reader still catches it when it decodes the row group."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from msrec_dist.data.schema import DataError
from tests.conftest import TINY_CONFIG
from tests.data.test_reader import BAD_ROWS

TINY_MODEL = ["model.star.hidden=[16,8]", "model.experts.hidden=8", "model.mixing.hidden=8", "model.tower.hidden=[4]",
              "model.attention.head_dim=4", "run.progress=false", "run.tensorboard=false", "train.log_every=1",
              "reader.batch_size=4", "train.epochs=1", "train.warmup_steps=1"]

# the three cases of issue 28, each placed in the second file of its split (row 6), so that
# without the scan the run would get past steps (or all of training) before reaching it
CASES = {  # case → (split, overrides, column)
    "eval_id_out_of_range": ("eval", {"item_id": [0, 1, 2, 3, 4, 5, 50, 7]}, "item_id"),
    "train_inf_dense": ("train", {"price": np.array([0, 0, 0, 0, 0, 0, np.inf, 0], np.float32)}, "price"),
    "train_null_in_list": ("train", {"hist_item_ids": pa.array([[1], [], [2], [], [3], [], [4, None], []],
                                                               pa.list_(pa.int64()))}, "hist_item_ids"),
}


def _data_yaml(tmp_path, make_parquet, case: str) -> tuple[str, str]:
    split, overrides, _ = CASES[case]
    files = {"train": [make_parquet("train0.parquet", seed=0), make_parquet("train1.parquet", seed=1)],
             "eval": [make_parquet("eval0.parquet", seed=2), make_parquet("eval1.parquet", seed=3)]}
    bad = make_parquet(f"{split}1.parquet", overrides=overrides, row_group_size=3, seed=3)
    raw = {**TINY_CONFIG, "train": files["train"], "eval": files["eval"]}
    path = os.path.join(tmp_path, "data.yaml")
    with open(path, "w") as f:
        json.dump(raw, f)  # JSON is YAML
    return path, bad


def _run(data: str, run_dir, *sets: str):
    from msrec_dist.config import load_experiment
    from msrec_dist.distributed.context import init_distributed
    from msrec_dist.training.runner import run

    cfg = load_experiment("configs/msrec_full.yaml", data, tuple(TINY_MODEL) + (f"run.dir={run_dir}",) + sets)
    return run(cfg, init_distributed())


def _steps_logged(run_dir) -> int:
    path = os.path.join(run_dir, "train_log.jsonl")
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_value_stops_the_run_before_the_first_step(tmp_path, make_parquet, case):
    data, bad = _data_yaml(tmp_path, make_parquet, case)
    run_dir = tmp_path / "run"
    with pytest.raises(DataError) as e:
        _run(data, run_dir)
    msg = str(e.value)
    assert bad in msg and f"'{CASES[case][2]}'" in msg and "row 6:" in msg, msg
    assert _steps_logged(run_dir) == 0  # no step, no checkpoint
    assert not os.path.exists(run_dir / "checkpoints")


@pytest.mark.parametrize("case", sorted(CASES))
def test_scan_off_the_reader_still_catches_it_when_decoding(tmp_path, make_parquet, case):
    data, bad = _data_yaml(tmp_path, make_parquet, case)
    run_dir = tmp_path / "run"
    with pytest.raises(DataError) as e:
        _run(data, run_dir, "reader.scan=false")
    msg = str(e.value)
    assert bad in msg and f"'{CASES[case][2]}'" in msg and "row 6:" in msg, msg
    assert _steps_logged(run_dir) > 0  # found mid-run, as before the scan: steps had been taken


# ---------------------------------------------------------------- the scan alone
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_scan_names_file_column_row(tiny_cfg, make_parquet, case):
    from msrec_dist.data.scan import scan_files

    overrides, column, row = BAD_ROWS[case]
    good = make_parquet("good.parquet", rows=5)
    bad = make_parquet(f"bad_{case}.parquet", overrides=overrides, row_group_size=3)
    with pytest.raises(DataError) as e:
        scan_files(tiny_cfg, [good, bad])
    msg = str(e.value)
    assert f"bad_{case}.parquet" in msg and f"'{column}'" in msg and f"row {row}:" in msg, msg


def test_scan_covers_eval_and_counts_rows(tiny_cfg, make_parquet):
    from msrec_dist.data.scan import scan_splits

    tiny_cfg.train = [make_parquet("t.parquet", rows=7, row_group_size=2)]
    tiny_cfg.eval = [make_parquet("e.parquet", rows=5, seed=1)]
    assert scan_splits(tiny_cfg, True) == 12
    assert scan_splits(tiny_cfg, False) == 0
    tiny_cfg.eval = [make_parquet("e.parquet", rows=8, overrides=BAD_ROWS["id_too_large"][0])]
    with pytest.raises(DataError, match=r"e\.parquet: column 'item_id' row 6: id 50"):
        scan_splits(tiny_cfg, True)


def test_ranks_split_the_files_and_all_raise_the_first_error(tiny_cfg, make_parquet):
    from msrec_dist.data.scan import scan_splits

    files = [make_parquet(f"f{i}.parquet", seed=i) for i in range(3)]
    files[1] = make_parquet("f1.parquet", overrides=BAD_ROWS["inf_dense"][0])  # rank 1's (file i -> rank i % 2)
    tiny_cfg.train, tiny_cfg.eval = files[:2], files[2:]
    sent: dict[int, object] = {}
    for rank in (0, 1):  # each rank's own error, as it would send it
        scan_splits(tiny_cfg, True, rank, 2, gather=lambda e, r=rank: sent.__setitem__(r, e) or [None, None])
    assert sent[0] is None and "f1.parquet: column 'price' row 2:" in sent[1]
    for rank in (0, 1):  # the gathered errors: both ranks raise rank 1's message
        with pytest.raises(DataError) as e:
            scan_splits(tiny_cfg, True, rank, 2, gather=lambda e: [sent[0], sent[1]])
        assert str(e.value) == f"rank 1: {sent[1]}"
