"""A converted set trains: MovieLens (no dense features, a list feature) and AliExpress (dense
features, two scenarios) through msrec_dist.training.runner.run for a few steps on a world of one;
`train_3_steps` serves the other converters' tests too."""
from __future__ import annotations

import json
import os

import pytest

from msrec_dist.data.convert import aliexpress, movielens
from tests.data.test_convert_aliexpress import write as write_aliexpress
from tests.data.test_convert_movielens import write_100k


def train_3_steps(data: str, tmp_path) -> None:
    """Train 3 steps on the converted set `data` (a data.yaml with train/val/eval) with the tiny
    model on a world of one; checks the log."""
    from msrec_dist.config import load_experiment
    from msrec_dist.distributed.context import init_distributed
    from msrec_dist.training import runner
    from tests.distributed.launch import REPO, TINY_MODEL

    run_dir = tmp_path / "run"
    cfg = load_experiment(os.path.join(REPO, "configs/msrec_full.yaml"), data,
                          tuple(TINY_MODEL) + ("reader.batch_size=4", f"run.dir={run_dir}", "train.max_steps=3"))
    runner.run(cfg, init_distributed())
    with open(run_dir / "train_log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [e["step"] for e in log if "step" in e][-1] == 3


@pytest.mark.parametrize("name", ["movielens", "aliexpress"])
def test_converted_set_trains(tmp_path, name):
    if name == "movielens":
        data = movielens.convert(write_100k(tmp_path / "raw"), str(tmp_path / "data"), dim=4)
    else:
        data = aliexpress.convert(write_aliexpress(tmp_path / "raw"), str(tmp_path / "data"), dim=4)
    train_3_steps(data, tmp_path)
