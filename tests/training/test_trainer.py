"""The epoch loop's pieces in a world of one, no process group: the has-data agreement
(msrec_dist/training/agreement.py) and the trainer build_trainer picks (training/loop.py)."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from msrec_dist.config import TrainConfig
from msrec_dist.data.schema import DataError
from msrec_dist.distributed.context import DistContext
from msrec_dist.training.agreement import agreed_batches
from msrec_dist.training.loop import PipelinedTrainer, Trainer, build_trainer

CTX = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")


class _Batch:
    def __init__(self, size: int) -> None:
        self.size = size

    def to(self, device):
        return self


def _loader(sizes, fail_at=None):
    for i, size in enumerate(sizes):
        if i == fail_at:
            raise DataError("part-1.parquet: column item_id, row 123: out of range")
        yield _Batch(size)


def test_agreed_batches_yield_each_batch_with_the_global_rows_then_end():
    got = [(b.size, rows) for b, rows in agreed_batches(_loader([4, 4, 3]), data=None, ctx=CTX)]
    assert got == [(4, 4), (4, 4), (3, 3)]


def test_bad_data_raises_the_rank_and_message_after_the_good_batches():
    seen = []
    with pytest.raises(DataError, match=r"^rank 0: part-1.parquet: column item_id, row 123"):
        for b, _ in agreed_batches(_loader([4, 4, 4], fail_at=2), data=None, ctx=CTX):
            seen.append(b.size)
    assert seen == [4, 4]


def _state() -> SimpleNamespace:
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(lin.parameters(), lr=0.01)
    return SimpleNamespace(dense_params=list(lin.parameters()), dense_optimizer=opt, replicated_optimizer=None,
                           grad_sync=None, local_lookup=True,
                           scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))


@pytest.mark.parametrize("pipeline, kind", [("plain", Trainer), ("auto", Trainer), ("sparse_dist", PipelinedTrainer)])
def test_build_trainer_picks_the_loop_once(pipeline, kind):
    trainer = build_trainer(_state(), None, CTX, dataclasses.replace(TrainConfig(), pipeline=pipeline))
    assert type(trainer) is kind  # 'auto' on CPU: the plain loop
    assert trainer.dense_step.flat.bound()  # the dense gradients are views of one buffer from the start
