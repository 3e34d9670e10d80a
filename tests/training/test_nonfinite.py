"""A non-finite loss (train.nan_policy): caught before backward on every rank alike, stop or skip.

Unit tests on a one-layer model (plain Trainer, world of one), the cross-rank verdict with a fake
collective and with 2 real gloo ranks (torchrun), and whole runs (training/runner.run, in this
process) that blow up under train.dense_lr=1000, plain loop and torchrec's pipeline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from msrec_dist.distributed.context import DistContext
from msrec_dist.training import step as step_module
from msrec_dist.training.loop import Trainer
from msrec_dist.training.step import LossGuard, NonFiniteLoss

CTX = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Batch:
    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.size = x, x.shape[0]

    def to(self, device):
        return self


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, batch: _Batch):
        return self.lin(batch.x).pow(2).mean(), None


def _trainer(policy: str) -> Trainer:
    model = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = SimpleNamespace(model=model, dense_params=list(model.parameters()), dense_optimizer=opt,
                            replicated_optimizer=None, grad_sync=None, local_lookup=True,
                            scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    return Trainer(state, None, CTX, grad_clip=0.0, nan_policy=policy)


def _loader(bad_at: int, n: int = 5):
    for i in range(n):
        x = torch.ones(4, 3) * (i + 1)
        if i == bad_at:
            x[1, 2] = float("nan")
        yield _Batch(x)


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.state.model.parameters()]


def test_stop_raises_before_backward_and_before_on_step():
    trainer = _trainer("stop")
    seen, weights = [], []

    def on_step(steps, loss, batch):
        seen.append(steps)
        weights.append(_weights(trainer))
        return True

    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 3 \(step 3 of this epoch\) \(rank 0: nan"):
        trainer.train_epoch(_loader(bad_at=2), on_step)
    assert seen == [1, 2]  # the bad step never reaches on_step (the runner's checkpoints)
    for p, q in zip(trainer.state.model.parameters(), weights[-1]):
        assert torch.equal(p, q) and torch.isfinite(p).all()  # no NaN update
    assert all(float(p.grad.abs().sum()) == 0 for p in trainer.state.model.parameters())  # no backward


def test_skip_batch_skips_the_update_warns_and_goes_on():
    trainer = _trainer("skip_batch")
    weights, losses = [], []

    def on_step(steps, loss, batch):
        weights.append(_weights(trainer))
        losses.append(float(loss))
        return True

    with pytest.warns(RuntimeWarning, match=r"non-finite loss at step 3 .*1 batches skipped so far"):
        assert trainer.train_epoch(_loader(bad_at=2), on_step) == 5
    assert trainer.guard.skipped == 1
    assert [torch.isfinite(torch.tensor(v)).item() for v in losses] == [True, True, False, True, True]
    assert all(torch.equal(p, q) for p, q in zip(weights[1], weights[2]))  # step 3 changed nothing
    assert not all(torch.equal(p, q) for p, q in zip(weights[2], weights[3]))  # step 4 trained
    assert trainer.state.scheduler.last_epoch == 5  # the schedule still counts the skipped step


def test_a_rank_with_a_finite_loss_stops_too(monkeypatch):
    """Rank 0's loss is finite, rank 1's (the fake collective's other slot) is NaN: rank 0 stops,
    with the message rank 1 gets."""
    def fake_sum(t):
        t[1] += float("nan")
        return t

    monkeypatch.setattr(step_module, "all_reduce_sum_", fake_sum)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    guard = LossGuard("stop", rank=0, world_size=2, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    with pytest.raises(NonFiniteLoss, match=r"step 1 \(rank 1: nan; 1 of 2 ranks\)") as e:
        guard.finite(torch.tensor(0.5))
    assert e.value.losses.keys() == {1}
    skip = LossGuard("skip_batch", rank=0, world_size=2, scheduler=guard.scheduler)
    with pytest.warns(RuntimeWarning, match="skipped on every rank"):
        assert not skip.finite(torch.tensor(0.5))
    assert LossGuard("stop", 0, 1, guard.scheduler).finite(torch.tensor(0.5))


@pytest.mark.dist
def test_two_ranks_stop_with_the_same_error(tmp_path):
    """2 gloo ranks (torchrun): only rank 1's loss is NaN at its third step; both raise the same
    NonFiniteLoss at that step, before its backward."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "tests/training/nonfinite_worker.py", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1], got
    assert got[0]["step"] == 3 and got[0]["on_step"] == [1, 2]
    assert "rank 1: nan; 1 of 2 ranks" in got[0]["message"]


def _run(synth_data, run_dir, *sets):
    from msrec_dist.config import load_experiment
    from msrec_dist.distributed.context import init_distributed
    from msrec_dist.training.runner import run
    from tests.distributed.launch import TINY_MODEL

    cfg = load_experiment("configs/msrec_full.yaml", synth_data, tuple(TINY_MODEL) + (
        f"run.dir={run_dir}", "train.max_steps=10", "train.dense_lr=1000", "train.warmup_steps=0",
        "reader.batch_size=256", "train.checkpoint_every=1", "train.keep_checkpoints=10", *sets))
    return run(cfg, init_distributed())


@pytest.mark.parametrize("pipeline", ["plain", "sparse_dist"])
def test_run_stops_at_the_first_non_finite_loss(synth_data, tmp_path, pipeline):
    """train.dense_lr=1000: the loss is NaN within a few steps. The run raises, names the step, and
    writes no checkpoint (and no final metrics) from that step on."""
    with pytest.raises(NonFiniteLoss) as e:
        _run(synth_data, tmp_path, f"train.pipeline={pipeline}")
    bad = e.value.step
    assert 1 < bad <= 10 and f"at step {bad}" in str(e.value)
    steps = sorted(int(d.rsplit("_", 1)[-1]) for d in os.listdir(tmp_path / "checkpoints") if d.startswith("step_"))
    assert steps == list(range(1, bad)), steps
    assert not (tmp_path / "final_metrics.json").exists()


def test_skip_batch_run_goes_on_and_writes_strict_json(synth_data, tmp_path):
    """skip_batch: the run ends; the weights already blew up, so the eval predictions are NaN and
    the metrics say null (not logloss 0.0), in strict JSON."""
    with pytest.warns(RuntimeWarning, match="skipped on every rank"):
        result = _run(synth_data, tmp_path, "train.nan_policy=skip_batch", "train.checkpoint_every=0")
    assert result["steps"] == 10

    def no_constants(token):
        raise ValueError(f"bare {token} in final_metrics.json")

    written = json.loads((tmp_path / "final_metrics.json").read_text(), parse_constant=no_constants)
    cell = written["overall"]["click"]
    assert cell["logloss"] is None and cell["auc"] is None and cell["n"] > 0
