"""Synthetic generator: determinism, scenario imbalance, label consistency, files and config."""
from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from msrec_dist.data.schema import load_data_config
from msrec_dist.data.synth import SynthSpec, generate, main, oracle_auc, scenario_props


def _read(pattern: str):
    return pq.read_table(sorted(glob.glob(pattern)))


def test_deterministic_for_seed(tmp_path):
    a = generate(str(tmp_path / "a"), rows=3000, shards=2, seed=7, eval_rows=500, users=300, items=200)
    b = generate(str(tmp_path / "b"), rows=3000, shards=2, seed=7, eval_rows=500, users=300, items=200)
    c = generate(str(tmp_path / "c"), rows=3000, shards=2, seed=8, eval_rows=500, users=300, items=200)
    for split in ("train", "eval"):
        ta, tb, tc = (_read(os.path.join(os.path.dirname(p), split, "*.parquet")) for p in (a, b, c))
        assert ta.equals(tb)
        assert not ta.equals(tc)
    assert open(a).read() == open(b).read()


def test_generated_data_properties(synth_data):
    root = os.path.dirname(synth_data)
    cfg = load_data_config(synth_data)
    assert len(cfg.train) == 4 and len(cfg.eval) >= 1
    assert cfg.sparse_names == ["user_id", "item_id", "item_category", "user_segment", "hist_item_ids"]
    assert cfg.dense_names == ["d0", "d1", "d2", "d3"] and cfg.task_names == ["click", "convert"]
    train, ev = _read(f"{root}/train/*.parquet"), _read(f"{root}/eval/*.parquet")
    assert train.num_rows == 20_000 and ev.num_rows == 4_000
    assert "p_click" not in train.column_names and "p_convert" not in train.column_names
    assert {"p_click", "p_convert"} <= set(ev.column_names)
    for t in (train, ev):
        scen, click, conv = (t[c].to_numpy() for c in ("scenario", "click", "convert"))
        share = np.bincount(scen, minlength=3) / len(scen)
        assert share.argmin() == 2 and share[2] <= 0.10
        assert np.all(conv <= click)
        assert 0.10 <= click.mean() <= 0.25 and 0.02 <= conv.mean() <= 0.06
        lens = np.diff(t["hist_item_ids"].combine_chunks().offsets.to_numpy())
        assert lens.min() == 0 and lens.max() <= 20
    assert np.all(ev["p_convert"].to_numpy() <= ev["p_click"].to_numpy())
    for f in cfg.sparse:  # ids inside the declared tables
        col = train[f.name].combine_chunks()
        vals = col.flatten().to_numpy() if hasattr(col, "flatten") else col.to_numpy()
        assert vals.min() >= 0 and vals.max() < f.num_embeddings


def test_oracle_auc_in_range(synth_data):
    cfg = load_data_config(synth_data)
    auc = oracle_auc(cfg.eval, "click")
    assert 0.72 <= auc <= 0.88
    assert 0.5 < oracle_auc(cfg.eval, "convert") <= 1.0
    assert 0.6 < oracle_auc(cfg.eval, "click", scenario=2) <= 1.0


@pytest.mark.parametrize("s", [1, 2, 4, 6])
def test_scenario_profile(s):
    p = scenario_props(s, SynthSpec())
    assert len(p) == s and np.isclose(p.sum(), 1) and np.all(np.diff(p) <= 0)
    if s > 1:
        assert p[-1] <= 0.10


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--rows", "500", "--shards", "3", "--seed", "1", "--scenarios", "4",
          "--eval-rows", "100", "--users", "50", "--items", "40"])
    path = capsys.readouterr().out.strip()
    cfg = load_data_config(path)
    assert len(cfg.train) == 3 and cfg.num_scenarios == 4
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in cfg.train) == 500


def test_small_scenario_share_thins_the_train_split_only(tmp_path):
    """--small-scenario-share: the last scenario keeps ~P of the train rows, its val/eval share
    stays the default, and its train users also appear in the large scenarios."""
    path = generate(str(tmp_path), rows=40_000, shards=2, seed=0, eval_rows=10_000, users=500, items=200,
                    spec=SynthSpec(small_scenario_share=0.01))
    base = os.path.dirname(path)
    train = pq.read_table(os.path.join(base, "train"), columns=["scenario", "user_id"])
    scen, user = train["scenario"].to_numpy(), train["user_id"].to_numpy()
    assert 0.006 < (scen == 2).mean() < 0.014
    assert 0.08 < (pq.read_table(os.path.join(base, "eval"), columns=["scenario"])["scenario"].to_numpy() == 2).mean() < 0.12
    small_users = set(user[scen == 2].tolist())
    assert len(small_users & set(user[scen != 2].tolist())) >= 0.9 * len(small_users)
