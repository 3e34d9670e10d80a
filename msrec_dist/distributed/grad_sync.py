"""Data-parallel gradients: one buffer for all of them, and how they are averaged over ranks.

    backward ──autograd accumulates in place──► FlatGrads.buffer = [every dense gradient, flattened]
             ──fbgemm's table backward──► the replicated tables' gradient, a tensor of its own
    grad_sync "ddp":  torch DDP around the dense modules, and torchrec's DDP around each replicated
                      (data_parallel) table lookup, all-reduce in buckets during backward (two
                      reducers: two all-reduces a step, plus their per-step hooks)
    grad_sync "flat": no DDP; after backward FlatAllReduce averages the buffer in one all-reduce,
                      then the replicated tables' gradient in a second one (each divides by the
                      world size in the sum's pass)
    then: clip (dense gradients) → optimizers → zero the buffer (one fill); the tables' gradient
          is dropped (set to None), so the next backward hands its fresh tensor over as is

`grad_sync: auto` is "flat" on CPU (gloo) and "ddp" on CUDA. DDP's buckets overlap the all-reduce
with the rest of backward, which pays on GPUs (NCCL runs on its own stream). On CPU the gloo
all-reduce runs on the same cores as backward, so there is nothing to overlap with, and each
collective costs a round trip (gloo: 0.6-0.7 ms median on a 2-core host) on top of the reducers'
Python in every forward and backward. The flat sum itself goes through
msrec_dist.distributed.collectives.all_reduce_sum_ (shared memory when the ranks share a host).

Why by hand: torch's DDP and torchrec's replicated lookups each own a reducer, and neither merges
collectives with the other; torch's clip_grad_norm_ and zero_grad work per tensor.

Why the tables' gradient stays out of the buffer: fbgemm's dense backward returns a new, zero-filled
gradient of the whole table batch every step; bound as a view of the buffer, autograd added it
into the view, and the sum copied it into shared memory anyway. Left unbound it is taken as is and
summed by itself: one more shared-memory round instead of the add (2-5% faster steps at 2 ranks,
docs/distributed.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from msrec_dist.distributed.collectives import all_reduce_sum_

GRAD_SYNCS = ("auto", "ddp", "flat")


def resolve_grad_sync(mode: str, device_type: str) -> str:
    """'auto' → 'ddp' on CUDA, 'flat' elsewhere; other values as given."""
    if mode not in GRAD_SYNCS:
        raise ValueError(f"grad_sync must be one of {GRAD_SYNCS}, got {mode!r}")
    if mode != "auto":
        return mode
    return "ddp" if device_type == "cuda" else "flat"


class FlatGrads:
    """Gradients as views of one buffer: the clip is one norm and one scale, zeroing one fill,
    instead of ~35 small ops over the 15-50 gradient tensors (as long as the fused Adam step itself
    on CPU), and the all-reduce is one call.

    Autograd accumulates into an existing .grad in place, so the views stay bound until someone
    replaces them; bound() checks the data pointers every step (DDP with gradient_as_bucket_view
    swaps in its own bucket views; a caller may set grads to None), and callers then take torch's
    per-tensor path. A parameter without a gradient in a step keeps zeros, which changes no
    update of an SGD/Adam step that every parameter gets anyway (an empty batch gives zeros).
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params or len({(p.dtype, p.device) for p in self.params}) != 1:
            self.buffer, self.ptrs = None, []
            return
        p0 = self.params[0]
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=p0.dtype, device=p0.device)  # [N]
        offset = 0
        for p in self.params:
            p.grad = self.buffer[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        self.ptrs = [p.grad.data_ptr() for p in self.params]

    def bound(self) -> bool:
        return self.buffer is not None and all(
            p.grad is not None and p.grad.data_ptr() == ptr for p, ptr in zip(self.params, self.ptrs))

    def clip_(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over all the gradients at once (same global L2 norm and scale)."""
        total = torch.linalg.vector_norm(self.buffer)
        self.buffer.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total


class FlatAllReduce:
    """grad_sync 'flat': after backward, every data-parallel gradient averaged over the ranks: one
    all-reduce of FlatGrads' buffer (or, when the views were replaced, of the gradients flattened
    into one temporary), then one per replicated lookup weight (the tables' gradient, left out of
    the buffer: see the module docstring)."""

    def __init__(self, replicated_params: list[nn.Parameter], group: Optional[dist.ProcessGroup],
                 world_size: int) -> None:
        self.replicated_params = tuple(replicated_params)  # the replicated lookups' own weights
        self.group, self.world_size = group, world_size

    def all_reduce_(self, flat: FlatGrads) -> None:
        """Averages the gradients over the ranks, in place."""
        self._average_buffer_(flat)
        for p in self.replicated_params:  # every rank sums the same tensors, in the same order:
            if p.grad is None:  # zeros where no backward reached the lookup, whatever other ranks had
                p.grad = torch.zeros_like(p)
            all_reduce_sum_(p.grad, self.group, divisor=self.world_size)

    def _average_buffer_(self, flat: FlatGrads) -> None:
        if flat.bound():
            all_reduce_sum_(flat.buffer, self.group, divisor=self.world_size)  # the mean, in the sum's pass
            return
        grads = [p.grad for p in flat.params if p.grad is not None]
        if not grads:
            return
        buffer = _flatten_dense_tensors(grads)
        all_reduce_sum_(buffer, self.group, divisor=self.world_size)
        for g, synced in zip(grads, _unflatten_dense_tensors(buffer, grads)):
            g.copy_(synced)  # the temporary's values back into the gradients (unbound case)


def unwrap_replicated_lookups(module: nn.Module) -> list[nn.Parameter]:
    """Take torchrec's DDP off every replicated (data_parallel) table lookup of the sharded
    embedding modules in `module` (their gradients then stay local until FlatAllReduce); returns
    the unwrapped lookups' parameters. torchrec's own code unwraps these lookups wherever it needs
    the module (state_dict, named parameters), so nothing else sees the change."""
    params: list[nn.Parameter] = []
    for m in module.modules():
        lookups = getattr(m, "_lookups", None)
        if not isinstance(lookups, (list, nn.ModuleList)):
            continue
        for i, lookup in enumerate(lookups):
            if isinstance(lookup, DistributedDataParallel):
                lookup._remove_autograd_hooks()  # its reducer would still all-reduce in backward
                lookups[i] = lookup.module
                params += [p for p in lookup.module.parameters() if p.requires_grad]
    return params


@torch.no_grad()
def broadcast_from_rank0(tensors: list[torch.Tensor], group: Optional[dist.ProcessGroup]) -> None:
    """Rank 0's values into `tensors` on every rank, one broadcast per dtype (what DDP does at wrap time)."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for dtype in sorted({t.dtype for t in tensors}, key=str):  # one flat buffer needs one dtype
        same = [t.detach() for t in tensors if t.dtype == dtype]
        buffer = _flatten_dense_tensors(same)
        dist.broadcast(buffer, src=src, group=group)
        for t, value in zip(same, _unflatten_dense_tensors(buffer, same)):
            t.copy_(value)
