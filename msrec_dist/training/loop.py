"""The epoch loop: how this run trains is chosen once (build_trainer), then each epoch is driven.

    build_trainer(state, data, ctx, cfg.train) ──► Trainer (plain loop) | PipelinedTrainer
    trainer.train_epoch(loader, on_step):
        for batch, global_rows in agreed_batches(loader)       (agreement.py: same steps on every rank)
            loss = trainer.step(batch, global_rows)             (step.py: forward, backward, DenseStep)
            on_step(steps, loss, batch) → False ends the epoch (and the run)

Each mode is chosen once, where the state or the trainer is built; the step has no flags:
    gradient sync ddp | flat | none   build_train_state (distributed/model_parallel.py): DDP wrappers
                                      in backward, or state.grad_sync (FlatAllReduce) that DenseStep
                                      calls after backward; none in a world of one
    lookup local | DMP                build_train_state: FieldEmbedding.use_pooled_lookup (inside forward)
    plain | pipelined                 build_trainer: train.pipeline ('auto': pipelined on CUDA with
                                      DMP's lookup)
    sums shm | gloo                   build_train_state: enable_host_reduce (train.host_reduce), used
                                      by every all_reduce_sum_ (distributed/collectives.py)
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterator

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from msrec_dist.config import TrainConfig
from msrec_dist.batch import Batch
from msrec_dist.data.schema import DataConfig
from msrec_dist.distributed.context import DistContext
from msrec_dist.distributed.model_parallel import TrainState
from msrec_dist.training.agreement import agreed_batches
from msrec_dist.training.step import DenseStep, train_step

OnStep = Callable[[int, torch.Tensor, Batch], bool]  # (step in this epoch, loss, batch) → go on?


class Trainer:
    """The plain loop: one train_step per agreed batch, the loss rescaled to the global batch."""

    def __init__(self, state: TrainState, data: DataConfig, ctx: DistContext, grad_clip: float) -> None:
        self.state, self.data, self.ctx = state, data, ctx
        self.dense_step = DenseStep(state, grad_clip)  # binds the dense gradients to one buffer, once

    def step(self, batch: Batch, global_rows: int) -> torch.Tensor:
        """One optimizer step on this rank's part of a global batch of `global_rows` rows; returns
        this rank's share of the global-batch mean loss × world size."""
        return train_step(self.state, batch, global_rows, self.ctx.world_size, self.dense_step)

    def train_epoch(self, loader, on_step: OnStep) -> int:
        """Runs one epoch (or until on_step returns False); returns the steps run."""
        steps = 0
        for batch, global_rows in agreed_batches(loader, self.data, self.ctx):
            steps += 1
            if not on_step(steps, self.step(batch, global_rows), batch):
                break
        return steps


class PipelinedTrainer(Trainer):
    """Epochs through torchrec's TrainPipelineSparseDist: the input all-to-all of batch i+1
    overlaps the compute of batch i (on CUDA also the host-to-device copy). The pipeline runs
    forward, backward and DenseStep itself, on the module's local-mean loss as is, so a partial
    last batch is weighted per rank rather than per row."""

    def train_epoch(self, loader, on_step: OnStep) -> int:
        fetched: deque[Batch] = deque()  # the pipeline reads ahead; its step i trains the i-th batch

        def feed() -> Iterator[Batch]:
            for batch, _ in agreed_batches(loader, self.data, self.ctx):
                fetched.append(batch)
                yield batch

        self.state.model.train()
        pipeline = TrainPipelineSparseDist(self.state.model, self.dense_step, self.ctx.device)
        it, steps = feed(), 0
        try:
            while True:
                try:
                    loss, _, _ = pipeline.progress(it)
                except StopIteration:
                    return steps
                steps += 1
                if not on_step(steps, loss, fetched.popleft()):
                    return steps
        finally:
            pipeline.detach()  # restore the modules' own forward (evaluation, checkpoints, next epoch)


def build_trainer(state: TrainState, data: DataConfig, ctx: DistContext, train: TrainConfig) -> Trainer:
    """The plain loop, or the pipelined one where train.pipeline asks for it ('sparse_dist'; 'auto':
    on CUDA when the embedding goes through DMP, which the pipeline needs)."""
    pipelined = train.pipeline == "sparse_dist" or (
        train.pipeline == "auto" and ctx.device.type == "cuda" and not state.local_lookup)
    return (PipelinedTrainer if pipelined else Trainer)(state, data, ctx, train.grad_clip)

