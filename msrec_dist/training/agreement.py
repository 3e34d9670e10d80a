"""The has-data agreement: every rank trains (or evaluates) the same number of steps.

    loader ──next()──► Batch | None (this rank ran out) | DataError
       ──agree()──► one sum over ranks of [has_data, rows, failed]  (3 int64, one collective)
       all out       → the epoch ends on every rank at the same step (no hang)
       some out      → ranks without data run an empty batch (B = 0) so collectives match
       any failed    → every rank raises the same DataError (file, column, row)

The sum goes through distributed/collectives.all_reduce_sum_: shared memory when the ranks share
a host (microseconds, benchmarks/results/collectives.md), else gloo's pairwise exchange. It is
also the step's only host sync besides the logged loss. It once rode in the dense-gradient
all-reduce of the step before (3 extra slots); with the shared-memory sums its own collective
measured the same at 2 ranks (msrec B=512, 210 A/B rounds: own/carried median 1.006,
benchmarks/results/agreement_ab.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msrec_dist.batch import Batch
from msrec_dist.data.schema import DataConfig, DataError
from msrec_dist.distributed.collectives import all_reduce_sum_
from msrec_dist.distributed.context import DistContext


@dataclass
class Agreement:
    ranks_with_data: int
    global_rows: int  # rows in this step's global batch
    error: Optional[str]  # "rank r: <the first failing rank's message>", or None


def empty_batch(data: DataConfig, device: torch.device) -> Batch:
    """A zero-row batch for a rank whose data ran out while others still train.

    Its dtypes match the reader's (int64 values, int32 lengths): the sparse all-to-all sends
    lengths between ranks, and gloo crashes on ranks that disagree about their dtype.
    """
    return Batch(
        sparse=KeyedJaggedTensor.from_lengths_sync(keys=data.kjt_keys,
                                                   values=torch.zeros(0, dtype=torch.long),
                                                   lengths=torch.zeros(0, dtype=torch.int32)).to(device),
        dense=torch.zeros(0, data.dense_width, device=device),  # [0, dense columns]
        labels=torch.zeros(0, len(data.task_names), device=device),  # [0, tasks]
        scenario=torch.zeros(0, dtype=torch.long, device=device),  # [0]
        rows=torch.zeros(0, dtype=torch.long, device=device),  # [0]
    )


def next_or_error(it: Iterator[Batch]) -> tuple[Optional[Batch], Optional[str]]:
    """(the next batch, None), (None, None) at the end, or (None, message) on bad data."""
    try:
        return next(it), None
    except StopIteration:
        return None, None
    except DataError as e:  # the reader hands workers' DataErrors back unwrapped
        return None, str(e)


def agree(batch: Optional[Batch], error: Optional[str], ctx: DistContext) -> Agreement:
    """Sums this rank's [has_data, rows, failed] over ranks; on failure every rank gets the first
    rank's error (one all_gather of the messages, only then)."""
    flags = torch.tensor([int(batch is not None), batch.size if batch is not None else 0, int(error is not None)],
                         dtype=torch.long)  # [3]
    if ctx.world_size > 1:
        flags = all_reduce_sum_(flags.to(ctx.device))
    ranks_with_data, global_rows, failures = (int(x) for x in flags.tolist())  # host sync, once per step
    if not failures:
        return Agreement(ranks_with_data, global_rows, None)
    messages = [error]
    if ctx.world_size > 1:
        messages = [None] * ctx.world_size
        dist.all_gather_object(messages, error)
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    return Agreement(ranks_with_data, global_rows, f"rank {rank}: {message}")


def agreed_batches(loader, data: DataConfig, ctx: DistContext) -> Iterator[tuple[Batch, int]]:
    """Yields (this rank's batch or an empty one, global rows) while any rank has data; raises the
    same DataError on every rank when any rank met bad data."""
    it = iter(loader)
    while True:
        batch, error = next_or_error(it)
        verdict = agree(batch, error, ctx)
        if verdict.error is not None:
            raise DataError(verdict.error)
        if verdict.ranks_with_data == 0:
            return
        yield (batch.to(ctx.device) if batch is not None else empty_batch(data, ctx.device)), verdict.global_rows
