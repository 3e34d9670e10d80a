"""SASS's two stages through the runner: stage 1 (train.stage=pretrain) trains the tables, the
attention and its projection head on the contrastive loss (falling, no val evaluations, the loss
on the eval rows in final_metrics.json), and stage 2 (--init-from) starts from exactly those
weights and fine-tunes on the tasks; on 1 rank, and from 2 ranks to 1 and from 1 to 2."""
from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from msrec_dist.config import load_experiment
from msrec_dist.data.synth import SynthSpec, generate
from msrec_dist.distributed.context import init_distributed
from msrec_dist.training import runner
from tests.distributed.launch import REPO, command, errors

SMALL = ["model.sass.hidden=[16,8]", "model.sass.projection=[8]", "model.tower.hidden=[8]",
         "model.attention.head_dim=4", "reader.batch_size=256", "run.progress=false", "run.tensorboard=false",
         "train.log_every=1"]
ENCODER = ("model.embedding.ebc.embedding_bags.", "model.attention.")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return generate(str(tmp_path_factory.mktemp("sass_data")), rows=6_000, shards=2, seed=4, eval_rows=1_000,
                    users=300, items=200, spec=SynthSpec(small_scenario_share=0.02))


def run(data, run_dir, *sets, **kw) -> dict:
    cfg = load_experiment(os.path.join(REPO, "configs/sass.yaml"), data, tuple(SMALL) + (f"run.dir={run_dir}",) + sets)
    return runner.run(cfg, init_distributed(), **kw)


def weights(checkpoint: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(checkpoint, os.path.join(tmp, "c.pt"))
        return torch.load(os.path.join(tmp, "c.pt"), weights_only=False)["model"]


def step_dir(run_dir, step: int) -> str:
    return os.path.join(str(run_dir), "checkpoints", f"step_{step}")


def losses(run_dir) -> list[float]:
    with open(os.path.join(str(run_dir), "train_log.jsonl")) as f:
        return [line["loss"] for line in map(json.loads, f) if "loss" in line]


def assert_stage_2_starts_from_stage_1(pre: str, fine_step0: str) -> None:
    """The fine-tuning run's weights before its first step: the encoder exactly stage 1's."""
    source, target = weights(step_dir(pre, 20)), weights(fine_step0)
    encoder = [k for k in target if k.startswith(ENCODER)]
    assert len([k for k in encoder if "embedding_bags" in k]) == 4 and any("attention" in k for k in encoder)
    for key in encoder:
        torch.testing.assert_close(target[key], source[key], rtol=0, atol=0)
    assert not any(k.startswith("head.") for k in target)  # the projection head stays behind


def test_stage_1_then_stage_2_on_one_rank(data, tmp_path):
    pre = tmp_path / "pre"
    out = run(data, pre, "train.stage=pretrain", "train.max_steps=20")
    assert out["stage"] == "pretrain" and math.isfinite(out["eval_loss"])
    assert "per_scenario" not in out and not os.path.exists(pre / "checkpoints" / "best")
    curve = losses(pre)
    assert len(curve) == 20 and sum(curve[-5:]) < sum(curve[:5])  # the contrastive loss falls
    with open(pre / "train_log.jsonl") as f:
        assert not [line for line in map(json.loads, f) if "val" in line]  # no val evaluations
    start = run(data, tmp_path / "start", "train.epochs=0", init_from=str(pre))  # saves step_0, trains nothing
    assert_stage_2_starts_from_stage_1(str(pre), step_dir(tmp_path / "start", 0))
    fine = run(data, tmp_path / "fine", "train.max_steps=20", "train.eval_every=10", init_from=str(pre),
               init_optimizer="reset")
    assert fine["selection"] is not None and all(
        c["auc"] is not None for tasks in fine["per_scenario"].values() for c in tasks.values())
    with open(tmp_path / "fine" / "init_from.json") as f:
        transfer = json.load(f)
    assert transfer and start["steps"] == 0


@pytest.mark.parametrize("ranks", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_stage_1_and_stage_2_across_world_sizes(data, tmp_path, ranks):
    """Stage 1 on `ranks[0]` ranks (the user table model-parallel, table_wise, on 2), stage 2's
    start on `ranks[1]`: the encoder arrives exactly."""
    pre, start = str(tmp_path / "pre"), str(tmp_path / "start")
    sharded = ["sharding.constraints.user.sharding_types=[table_wise]"]
    stage_1 = SMALL + ["train.stage=pretrain", "train.max_steps=20"] + (sharded if ranks[0] == 2 else [])
    stage_2 = SMALL + ["train.epochs=0"] + (sharded if ranks[1] == 2 else [])
    if ranks[0] == 2:
        done = subprocess.run(command(2, data, pre, stage_1, config="configs/sass.yaml"), cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, errors(done)
        run(data, start, *stage_2[len(SMALL):], init_from=pre)
    else:
        run(data, pre, *stage_1[len(SMALL):])
        done = subprocess.run(command(2, data, start, stage_2, config="configs/sass.yaml") + ["--init-from", pre],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, errors(done)
    assert_stage_2_starts_from_stage_1(pre, step_dir(start, 0))


def test_msrec_with_the_transfer_block_pre_trains_and_fine_tunes(data, tmp_path):
    """configs/msrec_sass.yaml (msrec's network, model.sass.block): the same two stages."""
    cfg = load_experiment(os.path.join(REPO, "configs/msrec_sass.yaml"), data,
                          tuple(SMALL) + (f"run.dir={tmp_path / 'pre'}", "train.stage=pretrain", "train.max_steps=6"))
    assert math.isfinite(runner.run(cfg, init_distributed())["eval_loss"])
    cfg = load_experiment(os.path.join(REPO, "configs/msrec_sass.yaml"), data,
                          tuple(SMALL) + (f"run.dir={tmp_path / 'fine'}", "train.max_steps=6"))
    out = runner.run(cfg, init_distributed(), init_from=str(tmp_path / "pre"), init_optimizer="reset")
    with open(tmp_path / "fine" / "init_from.json") as f:
        loaded = json.load(f)["model"]["loaded"]
    assert any(k.startswith("model.attention.") for k in loaded) and out["per_scenario"]
