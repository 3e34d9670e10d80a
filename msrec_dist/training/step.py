"""One optimizer step: forward, the loss rescaled to the global batch, backward, DenseStep.

    batch (B local rows of a global batch of G) ──model──► loss (local mean) × B·world/G
      ──backward──► fused sparse optimizer (model-parallel tables, inside backward)
                    dense gradients into FlatGrads' one buffer; replicated tables' gradient
      ──DenseStep.step──► average over ranks (grad_sync 'flat': FlatAllReduce; 'ddp' did it in
                    backward; a world of one: nothing) → replicated tables' optimizer → clip the
                    dense gradients → dense optimizer → zero the buffer → LR schedule
"""
from __future__ import annotations

import torch

from msrec_dist.batch import Batch
from msrec_dist.distributed.grad_sync import FlatGrads
from msrec_dist.distributed.model_parallel import TrainState


class DenseStep:
    """The optimizer step after backward: average over ranks, replicated tables' optimizer, clip the
    dense gradients, dense optimizer, LR schedule.

    The model-parallel tables' sparse optimizer already ran inside backward (fused). Has the
    `zero_grad`/`step` interface torchrec's train pipelines call.
    """

    def __init__(self, state: TrainState, grad_clip: float) -> None:
        self.state, self.grad_clip = state, grad_clip
        self.average = state.grad_sync  # FlatAllReduce (grad_sync 'flat', world > 1) or None
        self.flat = FlatGrads(state.dense_params)  # binds every dense .grad to a view of one buffer

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.flat.bound():  # the views stay; zeros change no update (see FlatGrads)
            self.flat.buffer.zero_()
        else:
            self.state.dense_optimizer.zero_grad(set_to_none=set_to_none)
        if self.state.replicated_optimizer is not None:  # None: the next backward's tensor is taken as is
            self.state.replicated_optimizer.zero_grad()

    def step(self) -> None:
        if self.average is not None:
            self.average.all_reduce_(self.flat)
        if self.state.replicated_optimizer is not None:  # sparse: not clipped, as the fused tables
            self.state.replicated_optimizer.step()
        if self.grad_clip > 0:
            if self.flat.bound():
                self.flat.clip_(self.grad_clip)
            else:  # someone replaced the views (DDP's bucket views, a caller's set_to_none)
                torch.nn.utils.clip_grad_norm_(self.state.dense_params, self.grad_clip, foreach=True)
        self.state.dense_optimizer.step()
        self.zero_grad()
        self.state.scheduler.step()


def train_step(state: TrainState, batch: Batch, global_rows: int, world_size: int, step: DenseStep) -> torch.Tensor:
    """One optimizer step; returns this rank's share of the global-batch mean loss × world_size.

    The module's loss is the local mean; rescaling it by local_rows · world / global_rows makes
    the average over ranks (and torchrec's 1/world division of model-parallel embedding gradients)
    the exact global-batch mean even when ranks hold different numbers of rows (last batch,
    uneven files).
    """
    if not state.model.training:  # Module.train() walks every submodule: ~0.2 ms, not every step
        state.model.train()
    loss, _ = state.model(batch)  # [] local mean
    loss = loss * (batch.size * world_size / max(global_rows, 1))
    loss.backward()  # the sparse optimizer runs inside backward (fused)
    step.step()
    return loss.detach()
