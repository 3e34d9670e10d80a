"""Export (msrec_dist/serving/export.py) and predict (serving/predict.py) against the training run
they come from: the fp32 program scores the eval split as the run's own evaluation did (per row,
1e-6) with the same metrics; the int8 tables keep every AUC within 0.001 and shrink the table
bytes by fbgemm's row format; the program loads in a process without msrec_dist; every row once
on 2 ranks; bad ids, unlabeled files and existing outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from msrec_dist.config import load_experiment
from msrec_dist.data.schema import DataError, load_data_config
from msrec_dist.data.synth import generate
from msrec_dist.distributed.context import init_distributed
from msrec_dist.serving.export import export_run
from msrec_dist.serving.predict import predict
from msrec_dist.serving.program import example_inputs
from msrec_dist.serving.trained import load_features
from msrec_dist.training import runner
from msrec_dist.typed_yaml import ConfigError
from tests.distributed.launch import REPO, TINY_MODEL


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return generate(str(tmp_path_factory.mktemp("export_data")), rows=6_000, shards=2, seed=3, eval_rows=3_000,
                    users=400, items=300)


def train(data: str, run_dir, config: str = "configs/msrec_full.yaml", *sets: str) -> dict:
    cfg = load_experiment(os.path.join(REPO, config), data,
                          tuple(TINY_MODEL) + ("reader.batch_size=256", f"run.dir={run_dir}", "train.eval_every=10",
                                               "train.max_steps=30") + sets)
    return runner.run(cfg, init_distributed())


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory) -> str:
    """msrec_full: every block on, the C++ kernels in the program (torch.ops.msrec.*)."""
    path = tmp_path_factory.mktemp("runs") / "full"
    train(data, path)
    return str(path)


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory) -> dict:
    """The run's best weights exported with the compiled program too: fp32 and int8 tables."""
    root = tmp_path_factory.mktemp("exports")
    return {q: (str(root / str(q)), export_run(run_dir, root / str(q), "best", quantize=q, compile=True))
            for q in (None, "int8")}


def read_preds(path: str) -> pa.Table:
    return pq.read_table(path).sort_by("row")


def eval_predictions(run: str) -> dict:
    p = np.load(os.path.join(run, "eval_predictions.npz"))
    order = np.argsort(p["rows"])
    return {"rows": p["rows"][order], "scores": p["scores"][order], "scenario": p["scenario"][order]}


def cells(metrics: dict) -> dict:
    return {(s, t): c for s, tasks in metrics["per_scenario"].items() for t, c in tasks.items()}


@pytest.mark.parametrize("program", ["export", "aoti"])
def test_fp32_program_scores_like_the_run(run_dir, data, exports, tmp_path, program):
    model_dir, manifest = exports[None]
    best = json.load(open(os.path.join(run_dir, "checkpoints", "best", "best.json")))
    final = json.load(open(os.path.join(run_dir, "final_metrics.json")))
    assert manifest["checkpoint"]["step"] == best["step"] == final["evaluated_step"]
    assert {"msrec.gate_combine_cpp.default", "msrec.field_attention_cpp.default"} <= set(manifest["ops"])
    assert os.path.exists(os.path.join(model_dir, "msrec_ops.so")) and manifest["quantize"] is None
    assert manifest["compiled"]["file"] == "model.aoti.pt2"
    assert manifest["feature_order"] == load_data_config(data).kjt_keys
    assert manifest["tasks"] == ["click", "convert"] and len(manifest["scenarios"]) == 3
    result = predict(model_dir, data, "eval", str(tmp_path / "p.parquet"), metrics=True, batch_size=700,
                     program_kind=program)
    got, want = read_preds(str(tmp_path / "p.parquet")), eval_predictions(run_dir)
    assert result["rows"] == got.num_rows == 3_000
    assert (got["row"].to_numpy() == want["rows"]).all() and (got["scenario"].to_numpy() == want["scenario"]).all()
    for t, task in enumerate(["click", "convert"]):
        np.testing.assert_allclose(got[f"p_{task}"].to_numpy(), want["scores"][:, t], rtol=0, atol=1e-6)
    mine, theirs = cells(result["metrics"]), cells(final)
    for key, cell in theirs.items():
        assert mine[key]["n"] == cell["n"]
        assert mine[key]["auc"] == pytest.approx(cell["auc"], abs=1e-6)
        assert mine[key]["logloss"] == pytest.approx(cell["logloss"], abs=1e-6)
    saved = json.load(open(tmp_path / "p.parquet.metrics.json"))
    assert cells(saved) == mine


def test_int8_tables(data, exports, tmp_path):
    fp32 = predict(exports[None][0], data, "eval", str(tmp_path / "f.parquet"), metrics=True)
    model_dir, manifest = exports["int8"]
    q = predict(model_dir, data, "eval", str(tmp_path / "q.parquet"), metrics=True)
    for key, cell in cells(fp32["metrics"]).items():
        assert abs(cells(q["metrics"])[key]["auc"] - cell["auc"]) <= 0.001, key
    sizes = manifest["table_bytes"]
    # fbgemm's int8 row: D bytes + fp16 scale and bias; per table, rows padded to a 64-byte line
    tables = manifest["tables"].values()
    assert sizes["fp32"] == sum(t["rows"] * t["dim"] * 4 for t in tables)
    assert sum(t["rows"] * (t["dim"] + 4) for t in tables) <= sizes["exported"] <= \
        sum(t["rows"] * (t["dim"] + 4) + 64 for t in tables)
    assert "fbgemm_gpu" in manifest["versions"] and manifest["quantize"] == "int8"
    assert any(op.startswith("fbgemm.int_nbit_split_embedding") for op in manifest["ops"])


def test_int8_is_3_5x_smaller_from_dim_32(data, tmp_path):
    """The ratio 4·D / (D + 4) reaches 3.5 at D = 28: at D = 32 the tables are >= 3.5x smaller."""
    cfg = yaml.safe_load(open(data))
    for f in cfg["sparse"]:
        f["dim"] = 32
    base = os.path.dirname(data)
    cfg.update({k: [os.path.join(base, p) for p in ([cfg[k]] if isinstance(cfg[k], str) else cfg[k])]
                for k in ("train", "val", "eval")})
    wide = tmp_path / "data32.yaml"
    wide.write_text(yaml.safe_dump(cfg))
    train(str(wide), tmp_path / "r", "configs/msrec.yaml", "train.max_steps=10")
    manifest = export_run(str(tmp_path / "r"), tmp_path / "q", "latest", quantize="int8", compile=False)
    assert manifest["table_bytes"]["ratio"] >= 3.5


def _export(run_dir: str, out, **kw) -> str:
    export_run(run_dir, out, "best", compile=False, **kw)
    return str(out)


FRESH = """
import sys, json, torch
d = sys.argv[1]
man = json.load(open(d + '/manifest.json'))
if man['quantize']:
    import fbgemm_gpu
if any(op.startswith('msrec.') for op in man['ops']):
    torch.ops.load_library(d + '/msrec_ops.so')
programs = [torch.export.load(d + '/model.pt2').module(), torch._inductor.aoti_load_package(d + '/model.aoti.pt2')]
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    out = [[program(*x) for x in inputs] for program in programs]
assert not [m for m in sys.modules if m.startswith('msrec_dist')], 'msrec_dist was imported'
torch.save(out, sys.argv[3])
"""


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_fresh_process_without_msrec_dist_scores_any_batch(run_dir, exports, tmp_path, quantize):
    """model.pt2 and model.aoti.pt2 in a process that imports torch (+ fbgemm_gpu for int8) and
    loads the shipped ops library, never msrec_dist: batches of 1, 3 and 1000 rows."""
    out = exports[quantize][0]
    features = load_features(load_experiment(os.path.join(run_dir, "config.json")).data)
    inputs = [example_inputs(features, b) for b in (1, 3, 1000)]  # dynamic batch, 1 included
    torch.save(inputs, tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", FRESH, out, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    exported, compiled = torch.load(tmp_path / "out.pt")
    from msrec_dist.serving.predict import load_program, read_manifest

    program = load_program(out, read_manifest(out), "export")
    for x, y, z in zip(inputs, exported, compiled):
        assert y.shape == (x[-1].shape[0], 2) and ((y > 0) & (y < 1)).all()
        torch.testing.assert_close(y, program(*x), rtol=0, atol=0)
        torch.testing.assert_close(z, y, rtol=0, atol=1e-6)


def test_id_beyond_the_exported_table_is_an_error(run_dir, data, tmp_path):
    _export(run_dir, tmp_path / "m")
    cfg = yaml.safe_load(open(data))
    user = next(f for f in cfg["sparse"] if f["name"] == "user_id")
    rows = user["num_embeddings"]
    user["num_embeddings"] = rows + 10  # the user's data has grown a vocabulary the model never saw
    src = load_data_config(data).eval[0]
    table = pq.read_table(src)
    ids = table.column("user_id").to_numpy().copy()
    ids[5] = rows + 3
    table = table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(ids))
    os.makedirs(tmp_path / "eval")
    pq.write_table(table, tmp_path / "eval" / "part.parquet")
    cfg.update(train=[str(tmp_path / "eval" / "part.parquet")], eval=["eval/part.parquet"], val=[])
    (tmp_path / "grown.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DataError, match=r"part\.parquet: column 'user_id' row 5: id \d+ outside 0\.\.%d" % (rows - 1)):
        predict(str(tmp_path / "m"), str(tmp_path / "grown.yaml"), "eval", str(tmp_path / "p.parquet"))
    assert not os.path.exists(tmp_path / "p.parquet") and not os.path.exists(tmp_path / "p.parquet.tmp")
    # the program itself refuses too (a serving stack calls it without the reader)
    from msrec_dist.serving.predict import load_program, read_manifest

    program = load_program(str(tmp_path / "m"), read_manifest(str(tmp_path / "m")))
    x = list(example_inputs(load_features(data), 4))
    x[0] = x[0].clone()
    x[0][0] = rows + 3  # user_id is the first feature of the KJT order here
    with pytest.raises(RuntimeError, match="feature 'user_id'"):
        program(*x)


def test_unlabeled_files_and_existing_outputs(run_dir, data, tmp_path):
    _export(run_dir, tmp_path / "m")
    with pytest.raises(ConfigError, match="not empty"):
        _export(run_dir, tmp_path / "m")
    export_run(run_dir, tmp_path / "m", "latest", overwrite=True, compile=False)
    assert [p for p in os.listdir(tmp_path) if p.startswith("m.replaced-")]  # the first export moved aside
    src = load_data_config(data).eval[0]
    os.makedirs(tmp_path / "new")
    pq.write_table(pq.read_table(src).drop(["click", "convert"]), tmp_path / "new" / "x.parquet")
    cfg = yaml.safe_load(open(data))
    cfg.update(train=["new/x.parquet"], eval=["new/x.parquet"], val=[])
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(cfg))
    out = predict(str(tmp_path / "m"), str(tmp_path / "new.yaml"), "eval", str(tmp_path / "p.parquet"))
    assert out["rows"] == pq.ParquetFile(src).metadata.num_rows == read_preds(str(tmp_path / "p.parquet")).num_rows
    with pytest.raises(ConfigError, match="exists"):
        predict(str(tmp_path / "m"), str(tmp_path / "new.yaml"), "eval", str(tmp_path / "p.parquet"))
    with pytest.raises(ConfigError, match="--metrics needs the label columns"):
        predict(str(tmp_path / "m"), str(tmp_path / "new.yaml"), "eval", str(tmp_path / "q.parquet"), metrics=True)


def test_checkpoint_choices(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint step_999"):
        export_run(run_dir, tmp_path / "a", "step_999", compile=False)
    with pytest.raises(ConfigError, match="best, latest or step_N"):
        export_run(run_dir, tmp_path / "b", "newest", compile=False)
    steps = sorted(int(n.split("_")[1]) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith("step_"))
    assert export_run(run_dir, tmp_path / "c", f"step_{steps[-1]}", compile=False)["checkpoint"]["step"] == steps[-1]


def test_two_rank_checkpoint_and_two_rank_predict(data, tmp_path):
    """A checkpoint of 2 ranks (the user table model-parallel: table_wise, the planner's CPU choice
    for a sharded table; the others replicated) exports to the run's own eval
    predictions; predict on 2 ranks scores every row exactly once, with the 1-rank metrics."""
    from tests.distributed.launch import train as train_ranks

    sets = ["reader.batch_size=128", "train.eval_every=10", "train.max_steps=20",
            "sharding.constraints.user.sharding_types=[table_wise]"]
    done = train_ranks(2, data, str(tmp_path / "r2"), sets)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.load(open(tmp_path / "r2" / "plan.json"))
    assert "table_wise" in json.dumps(plan)
    _export(str(tmp_path / "r2"), tmp_path / "m")
    one = predict(str(tmp_path / "m"), data, "eval", str(tmp_path / "p1.parquet"), metrics=True)
    got, want = read_preds(str(tmp_path / "p1.parquet")), eval_predictions(str(tmp_path / "r2"))
    assert (got["row"].to_numpy() == want["rows"]).all()
    for t, task in enumerate(["click", "convert"]):
        np.testing.assert_allclose(got[f"p_{task}"].to_numpy(), want["scores"][:, t], rtol=0, atol=1e-6)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "msrec_dist.predict", "--model", str(tmp_path / "m"), "--data", data, "--out", str(tmp_path / "p2"),
           "--metrics", "--batch-size", "500"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = sorted(os.listdir(tmp_path / "p2"))
    assert parts == ["metrics.json", "part-r00000.parquet", "part-r00001.parquet"]
    rows = [pq.read_table(tmp_path / "p2" / p)["row"].to_numpy() for p in parts[1:]]
    assert len(rows[0]) and len(rows[1]) and sorted(np.concatenate(rows).tolist()) == list(range(3_000))
    two = json.load(open(tmp_path / "p2" / "metrics.json"))
    for key, cell in cells(one["metrics"]).items():
        assert cells(two)[key]["auc"] == pytest.approx(cell["auc"], abs=1e-9)
