"""Train and evaluation loops over the sharded model, with the has-data agreement.

    loader ──next()──► Batch | None (this rank ran out) | DataError
       ──agree()──► every rank learns: how many ranks have data, whether any rank failed
       all out       → the epoch ends on every rank at the same step (no hang)
       some out      → ranks without data run an empty batch (B = 0) so collectives match
       any failed    → every rank raises the same DataError (file, column, row)
    model(batch) → (loss, (loss, logits, labels)); loss.backward() runs the fused sparse
    optimizer; (grad_sync 'flat') the dense gradients are averaged in one all-reduce and the
    replicated tables' gradient in a second (distributed/grad_sync.py); the replicated tables' optimizer steps; dense grads are clipped, the dense optimizer and LR
    schedule step.

One small all_reduce per step carries the agreement; it is also the step's only host sync
besides the logged loss. With grad_sync 'flat' in a world > 1 the agreement on batch k+1 rides
in step k's dense-gradient all-reduce instead (3 extra slots of its buffer), so the agreement
costs no collective of its own: over gloo each collective costs a round trip (and, with ranks bound to one core
each, often a scheduler tick), through shared memory on one host (train.host_reduce) microseconds
plus the wait for the slowest rank (benchmarks/results/collectives.md).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msrec_dist.data.batch import Batch
from msrec_dist.data.schema import DataConfig, DataError
from msrec_dist.distributed.collectives import all_reduce_sum_
from msrec_dist.distributed.context import DistContext
from msrec_dist.distributed.grad_sync import FlatGrads
from msrec_dist.distributed.model_parallel import TrainState
from msrec_dist.metrics.evaluator import ScenarioTaskMetrics


def empty_batch(data: DataConfig, device: torch.device) -> Batch:
    """A zero-row batch for a rank whose data ran out while others still train.

    Its dtypes match the reader's (int64 values, int32 lengths): the sparse all-to-all sends
    lengths between ranks, and gloo crashes on ranks that disagree about their dtype.
    """
    return Batch(
        sparse=KeyedJaggedTensor.from_lengths_sync(keys=data.kjt_keys,
                                                   values=torch.zeros(0, dtype=torch.long),
                                                   lengths=torch.zeros(0, dtype=torch.int32)).to(device),
        dense=torch.zeros(0, len(data.dense_names), device=device),
        labels=torch.zeros(0, len(data.task_names), device=device),
        scenario=torch.zeros(0, dtype=torch.long, device=device),
        rows=torch.zeros(0, dtype=torch.long, device=device),
    )


def next_or_error(it: Iterator[Batch]) -> tuple[Optional[Batch], Optional[str]]:
    try:
        return next(it), None
    except StopIteration:
        return None, None
    except DataError as e:  # the reader hands workers' DataErrors back unwrapped
        return None, str(e)


@dataclass
class Agreement:
    ranks_with_data: int
    global_rows: int  # rows in this step's global batch
    error: Optional[str]


AGREEMENT_SLOTS = 3  # [has_data, rows, failed]


def agreement_flags(batch: Optional[Batch], error: Optional[str]) -> list[int]:
    """This rank's [has_data, rows, failed], summed over ranks by the agreement."""
    return [int(batch is not None), batch.size if batch is not None else 0, int(error is not None)]


def agree(batch: Optional[Batch], error: Optional[str], ctx: DistContext) -> Agreement:
    """All-reduce [has_data, rows, failed] over ranks; on failure every rank gets the first error."""
    flags = torch.tensor(agreement_flags(batch, error), dtype=torch.long)
    if ctx.world_size > 1:
        flags = all_reduce_sum_(flags.to(ctx.device))
    return settle([int(x) for x in flags.tolist()], error, ctx)  # host sync, once per step


def settle(sums: list[int], error: Optional[str], ctx: DistContext) -> Agreement:
    """The agreement from the summed flags; on failure every rank gets the first rank's error
    (one all_gather of the messages, only then)."""
    ranks_with_data, global_rows, failures = sums
    if failures:
        messages = [None] * ctx.world_size
        if ctx.world_size > 1:
            dist.all_gather_object(messages, error)
        else:
            messages = [error]
        first = next((r, m) for r, m in enumerate(messages) if m is not None)
        return Agreement(ranks_with_data, global_rows, f"rank {first[0]}: {first[1]}")
    return Agreement(ranks_with_data, global_rows, None)


def agreed_batches(loader, data: DataConfig, ctx: DistContext,
                   step: Optional["DenseStep"] = None) -> Iterator[tuple[Batch, int]]:
    """Yields (this rank's batch or an empty one, global rows) while any rank has data;
    raises the same DataError on every rank when any rank met bad data.

    With a `step` that carries the agreement (DenseStep.carries_agreement), the consumer must run
    that step's step() exactly once per batch: the flags of the batch after this one are handed to
    it before the yield and come back summed from its gradient all-reduce, so the next batch is
    read one step early (the read-ahead thread holds it already) and no collective of its own runs.
    """
    it = iter(loader)
    batch, error = next_or_error(it)
    verdict = agree(batch, error, ctx)
    carry = step is not None and step.carries_agreement
    while True:
        if verdict.error is not None:
            raise DataError(verdict.error)
        if verdict.ranks_with_data == 0:
            return
        local = batch.to(ctx.device) if batch is not None else empty_batch(data, ctx.device)
        if not carry:
            yield local, verdict.global_rows
            batch, error = next_or_error(it)
            verdict = agree(batch, error, ctx)
            continue
        batch, error = next_or_error(it)
        step.carry(agreement_flags(batch, error))
        yield local, verdict.global_rows
        verdict = settle(step.carried(), error, ctx)


class DenseStep:
    """The optimizer step after backward: replicated tables' optimizer, clip dense grads, dense
    optimizer, LR schedule.

    The model-parallel tables' sparse optimizer already ran inside backward (fused). Has the
    `zero_grad`/`step` interface torchrec's train pipelines call.
    """

    def __init__(self, state: TrainState, grad_clip: float) -> None:
        self.state, self.grad_clip = state, grad_clip
        # with grad_sync 'flat' the has-data agreement of the next batch rides in the dense
        # gradients' all-reduce (AGREEMENT_SLOTS at the buffer's end)
        self.flat = FlatGrads(state.dense_params, extra=AGREEMENT_SLOTS if state.grad_sync else 0)
        self._summed: Optional[list[int]] = None  # the carried flags summed by the last step()

    @property
    def carries_agreement(self) -> bool:
        """Whether step()'s all-reduce can carry the agreement (grad_sync 'flat', one buffer)."""
        return self.state.grad_sync is not None and self.flat.extra is not None

    def carry(self, flags: list[int]) -> None:
        """Flags for the next step()'s all-reduce to sum (after this step's zero_grad)."""
        self.flat.extra.copy_(torch.tensor(flags, dtype=self.flat.extra.dtype))
        self._summed = None

    def carried(self) -> list[int]:
        """The carried flags summed over ranks by the last step()."""
        if self._summed is None:
            raise RuntimeError("DenseStep.carried(): no step() ran since carry() (one step per batch)")
        summed, self._summed = self._summed, None
        return summed

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.flat.bound():  # the views stay; zeros change no update (see FlatGrads)
            self.flat.buffer.zero_()  # the dense gradients and the carried slots
        else:
            self.state.dense_optimizer.zero_grad(set_to_none=set_to_none)
        if self.state.replicated_optimizer is not None:  # None: the next backward's tensor is taken as is
            self.state.replicated_optimizer.zero_grad()

    def step(self) -> None:
        if self.state.grad_sync is not None:  # average over ranks (grad_sync 'flat'; DDP did it in backward)
            self._summed = self.state.grad_sync.all_reduce_(self.flat)
        if self.state.replicated_optimizer is not None:  # sparse: not clipped, as the fused tables
            self.state.replicated_optimizer.step()
        if self.grad_clip > 0:
            if self.flat.bound():
                self.flat.clip_(self.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.state.dense_params, self.grad_clip, foreach=True)
        self.state.dense_optimizer.step()
        self.zero_grad()
        self.state.scheduler.step()


def train_step(state: TrainState, batch: Batch, global_rows: int, world_size: int, step: DenseStep) -> torch.Tensor:
    """One optimizer step; returns this rank's share of the global-batch mean loss × world_size.

    The module's loss is the local mean; rescaling it by local_rows · world / global_rows makes
    DDP's average (and torchrec's 1/world division of model-parallel embedding gradients) the
    exact global-batch mean even when ranks hold different numbers of rows (last batch, uneven
    files).
    """
    if not state.model.training:  # Module.train() walks every submodule: ~0.2 ms, not every step
        state.model.train()
    loss, _ = state.model(batch)
    loss = loss * (batch.size * world_size / max(global_rows, 1))
    loss.backward()  # the sparse optimizer runs inside backward (fused)
    step.step()
    return loss.detach()


@torch.no_grad()
def evaluate(state: TrainState, loader, data: DataConfig, ctx: DistContext) -> dict:
    """Global per scenario × task metrics over the eval split (every rank gets the same dict)."""
    metrics = ScenarioTaskMetrics(data.scenario.names, data.task_names).to(ctx.device)
    state.model.eval()
    for batch, _ in agreed_batches(loader, data, ctx):
        _, (_, logits, labels) = state.model(batch)
        metrics.update(logits, labels, batch.scenario)
    state.model.train()
    return metrics.compute()


def train_epoch(state: TrainState, loader, data: DataConfig, ctx: DistContext, grad_clip: float,
                on_step: Callable[[int, torch.Tensor, Batch], bool], pipelined: bool = False) -> int:
    """Runs one epoch; `on_step(local_step, loss, batch)` returns False to stop early.

    `pipelined` drives the steps with torchrec's TrainPipelineSparseDist (the input
    all-to-all of batch i+1 overlaps the compute of batch i; on CUDA also the host-to-device
    copy). It uses the module's local-mean loss as is, so a partial last batch is weighted per
    rank rather than per row.
    """
    dense_step = DenseStep(state, grad_clip)
    # unpipelined, each batch gets one dense_step.step(), which carries the agreement
    batches = agreed_batches(loader, data, ctx, None if pipelined else dense_step)
    steps = 0
    if not pipelined:
        for batch, global_rows in batches:
            loss = train_step(state, batch, global_rows, ctx.world_size, dense_step)
            steps += 1
            if not on_step(steps, loss, batch):
                break
        return steps
    fetched: deque[Batch] = deque()  # the pipeline reads ahead; step i trains the i-th batch

    def feed() -> Iterator[Batch]:
        for batch, _ in batches:
            fetched.append(batch)
            yield batch

    state.model.train()
    pipeline = TrainPipelineSparseDist(state.model, dense_step, ctx.device)
    it = feed()
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
