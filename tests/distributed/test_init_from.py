"""--init-from (msrec_dist/distributed/warm_start.py): a new run starts from another run's
checkpoint. Weights before the first step equal the source's exactly where shapes match, and a
fresh run's init elsewhere, with the report saying which; the optimizer state is kept or reset;
a table with more rows keeps its old rows (and their row-wise optimizer state); 2 ranks
(table_wise) → 1 rank (replicated) and back; and "days 1-2, then warm-start on day 3 with new
users" against one run over days 1-3.

A run with train.epochs=0 trains no step and saves checkpoints/step_0: the weights (and optimizer
state) a run starts training with.
"""
import glob
import itertools
import json
import math
import os
import subprocess
import tempfile

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from msrec_dist.config import load_experiment
from msrec_dist.data.schema import load_data_config
from msrec_dist.data.synth import generate
from msrec_dist.distributed import warm_start
from msrec_dist.distributed.context import init_distributed
from msrec_dist.distributed.model_parallel import fill_table_shard
from msrec_dist.train import parse_args
from msrec_dist.training import runner
from tests.distributed.launch import REPO, TINY_MODEL, command, errors, losses, train

USER = "model.embedding.ebc.embedding_bags.user.weight"
MOMENTUM = (f"sparse.{USER}", "user.momentum1")
NO_ATTENTION = "model.attention.enabled=false"
TABLE_WISE = ["sharding.replicate_max_mb=0"]  # every table model-parallel on 2 ranks


def run(data, run_dir, *sets, **kw) -> dict:
    cfg = load_experiment(os.path.join(REPO, "configs/msrec_full.yaml"), str(data),
                          tuple(TINY_MODEL) + ("reader.batch_size=128", f"run.dir={run_dir}") + sets)
    return runner.run(cfg, init_distributed(), **kw)


def saved(checkpoint) -> dict:
    """A DCP checkpoint as plain tensors: {"model": {key: tensor}, "optim": {"state": ...}}."""
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(checkpoint), os.path.join(tmp, "c.pt"))
        return torch.load(os.path.join(tmp, "c.pt"), weights_only=False)


def report(run_dir) -> dict:
    with open(os.path.join(run_dir, "init_from.json")) as f:
        return json.load(f)


def resized(data_yaml: str, out: str, rows: dict[str, int], **splits) -> str:
    """A copy of data_yaml (in `out`) with other num_embeddings per table and other split files."""
    with open(data_yaml) as f:
        raw = yaml.safe_load(f)
    base = os.path.dirname(os.path.abspath(data_yaml))
    for split in ("train", "val", "eval"):
        raw[split] = splits.get(split, os.path.join(base, raw[split]))
    raw["sparse"] = [dict(f, num_embeddings=rows.get(f["table"], f["num_embeddings"])) for f in raw["sparse"]]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "data.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


def fresh_rows(data_yaml: str, table: str, seed: int = 0) -> torch.Tensor:
    """A table's initial weights [rows, D] (model_parallel.init_embeddings, a pure function of seed and table)."""
    tables = load_data_config(data_yaml).tables()
    index = next(i for i, t in enumerate(tables) if t.name == table)
    out = torch.empty(tables[index].num_embeddings, tables[index].dim)
    fill_table_shard(out, 0, 0, tables[index].num_embeddings, tables[index].dim, seed, index)
    return out


def optim_state(ckpt: dict) -> dict:
    return {(p, n): v for p, s in ckpt.get("optim", {}).get("state", {}).items() for n, v in s.items()}


def assert_grown_copy(source: dict, target: dict, target_yaml: str, table_rows: int) -> None:
    """target = source everywhere (model and optimizer state), but the user table and its
    momentum, which have more rows: the old ones equal, the new ones as a fresh run's."""
    for key, value in source["model"].items():
        if key == USER:
            assert target["model"][key].shape[0] == table_rows
            assert torch.equal(target["model"][key][: len(value)], value)
            assert torch.equal(target["model"][key][len(value):], fresh_rows(target_yaml, "user")[len(value):])
        else:
            assert torch.equal(target["model"][key], value), key
    old, new = optim_state(source), optim_state(target)
    assert old.keys() == new.keys()
    for key, value in old.items():
        if key == MOMENTUM:
            assert value.abs().sum() > 0 and len(new[key]) == table_rows
            assert torch.equal(new[key][: len(value)], value) and not new[key][len(value):].any()
        else:
            assert torch.equal(new[key], value), key


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return generate(str(tmp_path_factory.mktemp("init_data")), rows=3_000, shards=2, seed=5, eval_rows=500,
                    users=300, items=200)


@pytest.fixture(scope="module")
def grown(data, tmp_path_factory) -> str:
    """The same files, the user table 360 rows instead of 300."""
    return resized(data, str(tmp_path_factory.mktemp("grown")), {"user": 360})


@pytest.fixture(scope="module")
def source(data, tmp_path_factory) -> str:
    """Run A: attention off, 6 steps, val every 3 with a score that only gets worse, so
    checkpoints/best is step 3 and step_6 the latest (with optimizer state)."""
    run_dir = str(tmp_path_factory.mktemp("src") / "A")
    calls = itertools.count()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "score", lambda metrics, metric: -float(next(calls)))
        run(data, run_dir, NO_ATTENTION, "train.max_steps=6", "train.eval_every=3")
    return run_dir


def test_fine_tune_from_best_reports_loaded_fresh_and_mismatched(data, source, tmp_path, capsys):
    """B: attention on (not in A: fresh), towers 12 wide instead of 8 (mismatched: fresh);
    without a suffix from A's best (step 3), optimizer reset (best holds none)."""
    other = ("model.tower.hidden=[12]", "train.epochs=0")
    run(data, tmp_path / "B", *other, init_from=source)
    run(data, tmp_path / "F", *other)  # the same model without --init-from: its fresh init
    rep = report(tmp_path / "B")
    assert (rep["which"], rep["step"], rep["optimizer"]) == ("best", 3, "reset")
    assert rep["checkpoint"] == os.path.join(source, "checkpoints", "best")
    model = rep["model"]
    assert set(model["fresh"]) == {"model.attention.0.qkv.weight", "model.attention.0.residual.weight"}
    assert set(model["mismatched"]) == {"model.towers.layers.0.weight", "model.towers.layers.0.bias",
                                        "model.towers.layers.1.weight"}  # layers.1.bias is [T, 1, 1] either way
    assert model["mismatched"]["model.towers.layers.0.weight"]["source_shape"] == [2, 16, 8]
    assert not model["grown"] and not rep["unused"]
    a = saved(os.path.join(source, "checkpoints", "best"))["model"]
    b = saved(tmp_path / "B" / "checkpoints" / "step_0")
    f = saved(tmp_path / "F" / "checkpoints" / "step_0")
    assert set(model["loaded"]) == set(a) - set(model["mismatched"]) and len(model["loaded"]) > 30
    for key in model["loaded"]:
        assert torch.equal(b["model"][key], a[key]), key
    for key in [*model["fresh"], *model["mismatched"]]:
        assert torch.equal(b["model"][key], f["model"][key]), key
    assert optim_state(b).keys() == optim_state(f).keys()  # reset: a new run's optimizer state
    assert all(torch.equal(v, optim_state(f)[k]) for k, v in optim_state(b).items())
    out = capsys.readouterr().out
    assert "| model.towers.layers.0.weight | mismatched | [2, 16, 12] | [2, 16, 8] |" in out
    assert "| model.attention.0.qkv.weight | fresh | [48, 16] | - | not in the source |" in out
    assert "model: 43 loaded, 0 grown, 2 fresh, 3 mismatched" in out


def test_warm_start_keeps_or_resets_the_optimizer_then_trains(data, source, tmp_path):
    latest = f"{source}:latest"
    run(data, tmp_path / "keep", NO_ATTENTION, "train.epochs=0", init_from=latest)
    a = saved(os.path.join(source, "checkpoints", "step_6"))
    keep = saved(tmp_path / "keep" / "checkpoints" / "step_0")
    rep = report(tmp_path / "keep")
    assert (rep["which"], rep["step"], rep["optimizer"]) == ("latest", 6, "keep")
    assert not any(rep["optimizer_state"][s] for s in ("grown", "fresh", "mismatched"))
    assert a["model"].keys() == keep["model"].keys()
    assert all(torch.equal(keep["model"][k], v) for k, v in a["model"].items())
    assert optim_state(a).keys() == optim_state(keep).keys() and len(optim_state(a)) > 100  # Adam's too
    assert all(torch.equal(optim_state(keep)[k], v) for k, v in optim_state(a).items())

    run(data, tmp_path / "reset", NO_ATTENTION, "train.epochs=0", init_from=latest, init_optimizer="reset")
    reset = saved(tmp_path / "reset" / "checkpoints" / "step_0")
    assert all(torch.equal(reset["model"][k], v) for k, v in a["model"].items())
    assert not optim_state(reset)[MOMENTUM].any()  # a new optimizer's
    assert not any(k[0].startswith("dense.") for k in optim_state(reset))  # Adam: no state before its first step

    # fine-tuning proper: this run's own steps from 0, its own schedule
    out = run(data, tmp_path / "train", NO_ATTENTION, "train.max_steps=4", init_from=latest)
    assert out["steps"] == 4 and len(losses(tmp_path / "train")) == 4
    assert all(math.isfinite(v) for v in losses(tmp_path / "train"))


def test_refused_before_anything_is_written(data, source, tmp_path):
    err = warm_start.InitFromError
    with pytest.raises(err, match="holds no optimizer state"):
        run(data, tmp_path / "r", NO_ATTENTION, init_from=source, init_optimizer="keep")  # best: weights only
    with pytest.raises(err, match="--resume continues"):
        run(data, tmp_path / "r", init_from=source, resume=True)
    with pytest.raises(err, match="this run's own directory"):
        run(data, source, init_from=f"{source}:latest", overwrite=True)
    with pytest.raises(err, match="no complete checkpoint step_5"):
        run(data, tmp_path / "r", init_from=f"{source}:step_5")
    with pytest.raises(err, match="no such directory"):
        run(data, tmp_path / "r", init_from=str(tmp_path / "nowhere"))
    assert not os.path.exists(tmp_path / "r") and os.path.exists(os.path.join(source, "final_metrics.json"))
    # a checkpoint directory given directly
    src = warm_start.resolve_source(os.path.join(source, "checkpoints", "step_6"))
    assert (src.which, src.step, src.run_dir, src.has_optimizer) == ("step_6", 6, source, True)
    for argv in (["--init-from", source, "--resume"], ["--init-optimizer", "keep"]):
        with pytest.raises(SystemExit):
            parse_args(["--config", "c.yaml", *argv])


def test_what_counts_as_grown():
    from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

    def meta(*size):
        return TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(size), [])
    state = f"sparse.{USER}.user.momentum1"
    assert warm_start.classify((300, 16), meta(300, 16), USER, set())[0] == "loaded"
    assert warm_start.classify((360, 16), meta(300, 16), USER, set())[0] == "grown"
    assert warm_start.classify((360,), meta(300), state, set())[0] == "grown"  # its row-wise optimizer state
    assert warm_start.classify((360, 16), None, USER, set())[0] == "fresh"
    for shape, saved, key, hashed in (((200, 16), meta(300, 16), USER, set()),  # shrunk
                                      ((360, 8), meta(300, 16), USER, set()),  # other dim
                                      ((360, 16), meta(300, 16), USER, {"user"}),  # hashed: every id's row moved
                                      ((4, 16), meta(3, 16), "model.embedding.scenario_emb.weight", set())):
        assert warm_start.classify(shape, saved, key, hashed)[0] == "mismatched", (shape, key, hashed)


def test_grown_rows_reach_every_row_shard(tmp_path):
    """A table (and its row-wise state) split into row shards, 300 saved rows → 360: each shard
    gets its part of the old rows (the cut shard half) and keeps its rows past 300."""
    init_distributed()
    old_w, old_m = torch.randn(300, 4), torch.rand(300)
    dcp.save({"w": old_w, "m": old_m}, checkpoint_id=str(tmp_path / "c"))

    def sharded(dims):  # rows [0, 200) and [200, 360), both here
        parts = [(0, 200), (200, 160)]
        return init_from_local_shards([Shard(torch.full((n, *dims), -1.0), ShardMetadata([r, *[0] * len(dims)],
                                                                                          [n, *dims], "rank:0/cpu"))
                                       for r, n in parts], 360, *dims)
    w, m = sharded([4]), sharded([])
    holders = {"w": warm_start._old_rows_holder(w, 300), "m": warm_start._old_rows_holder(m, 300)}
    assert [s.metadata.shard_sizes[0] for s in holders["w"].local_shards()] == [200, 100]
    dcp.load(holders, checkpoint_id=str(tmp_path / "c"))
    for name, value, old in (("w", w, old_w), ("m", m, old_m)):
        warm_start._copy_old_rows(holders[name], value)
        full = torch.cat([s.tensor for s in value.local_shards()])
        assert torch.equal(full[:300], old) and (full[300:] == -1).all()


@pytest.mark.dist
def test_two_ranks_table_wise_to_one_rank_with_a_grown_table(data, grown, tmp_path):
    proc = train(2, data, str(tmp_path / "S"), TABLE_WISE + ["train.max_steps=6", "reader.batch_size=128"])
    assert proc.returncode == 0, errors(proc)
    with open(tmp_path / "S" / "plan.json") as f:
        assert {t["sharding_type"] for t in json.load(f)["model.embedding.ebc"].values()} == {"table_wise"}
    run(grown, tmp_path / "T", "train.epochs=0", init_from=str(tmp_path / "S"))  # best: optimizer reset
    run(grown, tmp_path / "K", "train.epochs=0", init_from=f"{tmp_path / 'S'}:latest")
    rep = report(tmp_path / "K")
    assert rep["world_size"] == 1 and rep["optimizer"] == "keep"
    assert set(rep["model"]["grown"]) == {USER} and set(rep["optimizer_state"]["grown"]) == {".".join(MOMENTUM)}
    assert_grown_copy(saved(tmp_path / "S" / "checkpoints" / "step_6"),
                      saved(tmp_path / "K" / "checkpoints" / "step_0"), grown, 360)
    best = saved(tmp_path / "S" / "checkpoints" / "best")["model"]
    weights = saved(tmp_path / "T" / "checkpoints" / "step_0")["model"]
    assert all(torch.equal(weights[k][: len(v)], v) for k, v in best.items())


@pytest.mark.dist
def test_one_rank_to_two_ranks_table_wise_with_a_grown_table(grown, source, tmp_path):
    target = str(tmp_path / "T")
    cmd = command(2, grown, target, TABLE_WISE + [NO_ATTENTION, "train.epochs=0", "reader.batch_size=128"])
    proc = subprocess.run(cmd + ["--init-from", f"{source}:latest"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, errors(proc)
    assert f"| {USER} | grown | [360, 16] | [300, 16] |" in proc.stdout  # rank 0's table
    assert proc.stdout.count("init from ") == 1
    rep = report(target)
    assert rep["world_size"] == 2 and rep["optimizer"] == "keep"
    # every rank's tables in the report, though each rank's fused optimizer state holds its own
    momenta = {k for s in ("loaded", "grown") for k in rep["optimizer_state"][s] if k.startswith("sparse.")}
    assert momenta == {f"sparse.model.embedding.ebc.embedding_bags.{t}.weight.{t}.momentum1"
                       for t in ("user", "item", "category", "segment")}
    assert set(rep["optimizer_state"]["grown"]) == {".".join(MOMENTUM)}
    assert_grown_copy(saved(os.path.join(source, "checkpoints", "step_6")),
                      saved(os.path.join(target, "checkpoints", "step_0")), grown, 360)


# ---- periodic retraining: days 1-2, then day 3 with users new on day 3 ----

DAY_ROWS, USERS, OLD_USERS = 30_000, 400, 320
# Mean AUC (the scenario × task cells, the selection metric) of the day-3 warm start against one
# run over days 1-3 in the same order. Measured on 6 data seeds of this setup (docs/transfer.md):
# the gap was at most 0.012 (keep) and 0.011 (reset), while training the same rows in another
# order (one run, shuffled) moved the mean AUC by 0.003-0.035 (median 0.009). A warm start is
# "close enough" when its gap stays within that order effect: 0.02, above every gap measured.
# (This data's seed, 2: keep -0.0016, reset +0.0011.)
AUC_TOLERANCE = 0.02
DAYS = ("reader.shuffle=false", "train.eval_every=0", "train.warmup_steps=0", "train.epochs=1",
        "train.log_every=20", "run.tensorboard=false")


def mean_auc(metrics: dict) -> float:
    return float(np.mean([c["auc"] for tasks in metrics["per_scenario"].values() for c in tasks.values()]))


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> dict[str, str]:
    """Day files: the generated train rows cut in three in order; days 1-2 keep the rows of users
    below OLD_USERS (their data.yaml: a 320-row user table, val/eval of those users only); day 3
    has every user (400 rows). d123: days 1-3 in one run."""
    root = str(tmp_path_factory.mktemp("days"))
    gen = generate(os.path.join(root, "gen"), rows=DAY_ROWS, shards=1, seed=2, eval_rows=DAY_ROWS // 4,
                   users=USERS, items=200)
    split = {s: pq.read_table(glob.glob(os.path.join(root, "gen", s, "*.parquet"))[0]) for s in ("train", "val", "eval")}
    old = {s: t.filter(pc.less(t["user_id"], OLD_USERS)) for s, t in split.items()}
    bounds = np.linspace(0, DAY_ROWS, 4).astype(int)
    files = []
    for d in range(3):
        t = split["train"].slice(bounds[d], bounds[d + 1] - bounds[d])
        files.append(os.path.join(root, f"day{d + 1}.parquet"))
        pq.write_table(t if d == 2 else t.filter(pc.less(t["user_id"], OLD_USERS)), files[-1])
    for s in ("val", "eval"):
        pq.write_table(old[s], os.path.join(root, f"{s}_old.parquet"))
    return {
        "d12": resized(gen, os.path.join(root, "d12"), {"user": OLD_USERS}, train=files[:2],
                       val=os.path.join(root, "val_old.parquet"), eval=os.path.join(root, "eval_old.parquet")),
        "d3": resized(gen, os.path.join(root, "d3"), {}, train=files[2:]),
        "d123": resized(gen, os.path.join(root, "d123"), {}, train=files),
        "day3": files[2],
    }


def test_warm_start_on_day_3_with_new_users(days, tmp_path):
    a = tmp_path / "A"
    run(days["d12"], a, *DAYS)  # no val selection: --init-from takes the latest (step_N, optimizer kept)
    run(days["d3"], tmp_path / "B0", *DAYS, "train.epochs=0", init_from=str(a))
    ckpt_a = saved(next(iter(glob.glob(str(a / "checkpoints" / "step_*")))))
    b0 = saved(tmp_path / "B0" / "checkpoints" / "step_0")
    assert report(tmp_path / "B0")["optimizer"] == "keep"
    assert_grown_copy(ckpt_a, b0, days["d3"], USERS)

    warm = {opt: run(days["d3"], tmp_path / f"B_{opt}", *DAYS, init_from=str(a), init_optimizer=opt)
            for opt in ("keep", "reset")}
    one = run(days["d123"], tmp_path / "C", *DAYS)  # days 1-3 in one run, the same order
    shuffled = run(days["d123"], tmp_path / "C2", *DAYS[1:])  # the same rows in another order
    # a user first seen on day 3 trains: its row moves from its fresh init
    new_users = np.unique(pq.read_table(days["day3"], columns=["user_id"])["user_id"].to_numpy())
    new_users = torch.from_numpy(new_users[new_users >= OLD_USERS])
    assert len(new_users) > 20
    final = saved(next(iter(glob.glob(str(tmp_path / "B_keep" / "checkpoints" / "step_*")))))["model"][USER]
    moved = (final[new_users] - b0["model"][USER][new_users]).abs().sum(1)
    assert (moved > 0).all()
    assert all(math.isfinite(v) for v in losses(tmp_path / "B_keep"))
    gaps = {opt: mean_auc(m) - mean_auc(one) for opt, m in warm.items()}
    print(f"day-3 warm start vs one run, mean AUC: one {mean_auc(one):.4f}, keep {gaps['keep']:+.4f}, "
          f"reset {gaps['reset']:+.4f}; one run shuffled {mean_auc(shuffled) - mean_auc(one):+.4f}")
    assert all(abs(g) <= AUC_TOLERANCE for g in gaps.values()), gaps
