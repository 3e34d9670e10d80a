"""The train loop's in-place sum all-reduce: torch.distributed's, or on gloo pairwise exchanges.

    all_reduce_sum_(t)
      gloo, world a power of two: recursive doubling, log2(world) rounds; in round k every rank
          swaps its running sum with rank ^ 2^k (isend + irecv) and adds what it received
      otherwise (NCCL, other world sizes): dist.all_reduce

Why by hand: on this project's 2-core CPU machine gloo's all_reduce of a small tensor takes
3-5 ms in a good share of calls, while an isend/irecv exchange of the same tensor between the
same two processes mostly does not (`python -m benchmarks.collectives`, 400 calls per size).
Ranks unbound: all_reduce of 3 to 30k values median 0.55-0.64 ms with 14-31% of calls over 2 ms,
the exchange 0.35-0.38 ms with 0-2% (up to 65k values); at 306k values both take ~1.05 ms and at
1M values both are bandwidth-bound. Ranks bound to one core each (train.py's default), both
suffer more: over 2 ms in 55-66% of all_reduce's calls and 22-65% of the exchange's.

Every rank ends with bitwise the same sum: in each round the two partners add the same two
values (a + b == b + a in IEEE arithmetic), so they hold equal partial sums for the next round.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def uses_exchange(group: Optional[dist.ProcessGroup] = None) -> bool:
    """Whether all_reduce_sum_ runs the pairwise exchange in this group."""
    return dist.get_backend(group) == "gloo" and is_power_of_two(dist.get_world_size(group))


def all_reduce_sum_(t: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum `t` over the ranks of `group` in place (every rank gets the same values); returns `t`."""
    world = dist.get_world_size(group)
    if world == 1:
        return t
    if not uses_exchange(group):
        dist.all_reduce(t, group=group)
        return t
    me = dist.get_rank(group)
    received = torch.empty_like(t)
    step = 1
    while step < world:
        peer = dist.get_global_rank(group, me ^ step) if group is not None else me ^ step
        works = [dist.isend(t, peer, group=group), dist.irecv(received, peer, group=group)]
        for w in works:
            w.wait()
        t.add_(received)
        step <<= 1
    return t


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks too (as
    torch.distributed.nn.functional.all_reduce does), through all_reduce_sum_."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_sum_(t.detach().clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_sum_(grad.clone(memory_format=torch.contiguous_format))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of `t` over the default group's ranks (a new tensor)."""
    return _AllReduceSum.apply(t)
