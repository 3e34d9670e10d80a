"""The epoch loop: how this run trains is chosen once (build_trainer), then each epoch is driven.

    build_trainer(state, data, ctx, cfg.train) ──► Trainer (plain loop) | PipelinedTrainer
    trainer.train_epoch(loader, on_step):
        for batch, global_rows in agreed_batches(loader)       (agreement.py: same steps on every rank)
            loss = trainer.step(batch, global_rows)             (step.py: forward, LossGuard, backward,
                                                                 DenseStep)
            on_step(steps, loss, batch) → False ends the epoch (and the run)
    a non-finite loss on any rank (train.nan_policy stop): NonFiniteLoss out of train_epoch on every
    rank, before that step's backward and before its on_step (so no checkpoint of it is written)

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
from msrec_dist.training.oov_dropout import OOVDropout
from msrec_dist.training.step import DenseStep, LossGuard, NonFiniteLoss, train_step

OnStep = Callable[[int, torch.Tensor, Batch], bool]  # (step in this epoch, loss, batch) → go on?


class Trainer:
    """The plain loop: one train_step per agreed batch, the loss rescaled to the global batch."""

    def __init__(self, state: TrainState, data: DataConfig, ctx: DistContext, grad_clip: float,
                 nan_policy: str = "stop", augment: Callable[[Batch], Batch] | None = None) -> None:
        self.state, self.data, self.ctx = state, data, ctx
        self.dense_step = DenseStep(state, grad_clip)  # binds the dense gradients to one buffer, once
        self.guard = LossGuard(nan_policy, ctx.rank, ctx.world_size, state.scheduler)
        self.augment = augment or (lambda batch: batch)  # on the host batch, before the step (OOVDropout)

    def step(self, batch: Batch, global_rows: int) -> torch.Tensor:
        """One optimizer step on this rank's part of a global batch of `global_rows` rows; returns
        this rank's share of the global-batch mean loss × world size."""
        return train_step(self.state, batch, global_rows, self.ctx.world_size, self.dense_step, self.guard)

    def train_epoch(self, loader, on_step: OnStep) -> int:
        """Runs one epoch (or until on_step returns False); returns the steps run. Raises
        NonFiniteLoss (every rank alike) before the step whose loss is not finite reaches on_step."""
        steps = 0
        for batch, global_rows in agreed_batches(loader, self.data, self.ctx):
            steps += 1
            try:
                loss = self.step(self.augment(batch), global_rows)
            except NonFiniteLoss as e:
                e.step_in_epoch = steps
                raise
            if not on_step(steps, loss, batch):
                break
        return steps


class GuardedPipeline(TrainPipelineSparseDist):
    """torchrec's pipeline with the LossGuard between forward and backward: the check sees the
    module's loss as the pipeline backpropagates it (the local mean), and a skipped batch skips
    backward and DenseStep.step (DenseStep.skip advances the schedule)."""

    def __init__(self, model, dense_step: DenseStep, device: torch.device, guard: LossGuard) -> None:
        super().__init__(model, dense_step, device)
        self.guard, self.skip_this = guard, False

    def _backward(self, losses: torch.Tensor) -> None:
        self.skip_this = not self.guard.finite(losses)  # raises NonFiniteLoss under 'stop'
        if not self.skip_this:
            super()._backward(losses)

    def _optimizer_step(self) -> None:
        if self.skip_this:
            self._optimizer.skip()
        else:
            super()._optimizer_step()


class PipelinedTrainer(Trainer):
    """Epochs through torchrec's TrainPipelineSparseDist: the input all-to-all of batch i+1
    overlaps the compute of batch i (on CUDA also the host-to-device copy). The pipeline runs
    forward, backward and DenseStep itself, on the module's local-mean loss as is, so a partial
    last batch is weighted per rank rather than per row. The LossGuard runs inside it, between
    forward and backward (GuardedPipeline), as in the plain loop."""

    def train_epoch(self, loader, on_step: OnStep) -> int:
        fetched: deque[Batch] = deque()  # the pipeline reads ahead; its step i trains the i-th batch

        def feed() -> Iterator[Batch]:
            for batch, _ in agreed_batches(loader, self.data, self.ctx):
                batch = self.augment(batch)
                fetched.append(batch)
                yield batch

        self.state.model.train()
        pipeline = GuardedPipeline(self.state.model, self.dense_step, self.ctx.device, self.guard)
        it, steps = feed(), 0
        try:
            while True:
                try:
                    loss, _, _ = pipeline.progress(it)
                except StopIteration:
                    return steps
                except NonFiniteLoss as e:
                    e.step_in_epoch = steps + 1
                    raise
                steps += 1
                if not on_step(steps, loss, fetched.popleft()):
                    return steps
        finally:
            pipeline.detach()  # restore the modules' own forward (evaluation, checkpoints, next epoch)


def is_pipelined(state: TrainState, ctx: DistContext, train: TrainConfig) -> bool:
    """Whether this run trains through the pipeline: train.pipeline 'sparse_dist', or 'auto' on CUDA
    when the embedding goes through DMP, which the pipeline needs."""
    return train.pipeline == "sparse_dist" or (
        train.pipeline == "auto" and ctx.device.type == "cuda" and not state.local_lookup)


def build_trainer(state: TrainState, data: DataConfig, ctx: DistContext, train: TrainConfig) -> Trainer:
    """The plain loop, or the pipelined one (is_pipelined)."""
    cls = PipelinedTrainer if is_pipelined(state, ctx, train) else Trainer
    augment = OOVDropout(data, train.oov_dropout, train.oov_dropout_features) if train.oov_dropout > 0 else None
    return cls(state, data, ctx, train.grad_clip, train.nan_policy, augment)

