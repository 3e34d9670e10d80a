"""The train loop's in-place sum all-reduce: through shared memory, gloo pairwise exchanges or
torch.distributed's.

    all_reduce_sum_(t, group, divisor=1)   (t = the sum over ranks / divisor)
      a SharedMemoryAllReduce enabled for the group (every rank on this host, gloo, the C++
          extension built; `enable_host_reduce`): each rank copies t into its slot of a mapped
          segment, waits until every rank has (a short spin, then sleeps; up to timeout_s,
          train.collective_timeout_s), and sums the slots in rank order, dividing in the same
          pass (csrc/shm_all_reduce.cpp)
      gloo, world a power of two: recursive doubling, log2(world) rounds; in round k every rank
          swaps its running sum with rank ^ 2^k (isend + irecv) and adds what it received
      otherwise (NCCL, other world sizes): dist.all_reduce
      (these two then divide in a pass of their own: the same bits as the shared-memory op's)

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

import os
import socket
import tempfile
import warnings
import weakref
from typing import Optional

import torch
import torch.distributed as dist

HOST_REDUCES = ("auto", "shm", "gloo")
SLOT_BYTES = 2 << 20  # per rank and parity (8 MiB for 2 ranks, 32 MiB for 8); longer tensors take several rounds


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def uses_exchange(group: Optional[dist.ProcessGroup] = None) -> bool:
    """Whether all_reduce_sum_ runs the pairwise exchange in this group."""
    return dist.get_backend(group) == "gloo" and is_power_of_two(dist.get_world_size(group))


class SharedMemoryUnavailable(RuntimeError):
    """The segment could not be made (raised on every rank of the group alike)."""


class SharedMemoryAllReduce:
    """In-place sum over the ranks of one host through a file every rank maps (MAP_SHARED, via
    torch.from_file), by the C++ op msrec::shm_all_reduce_sum_ (layout and protocol there).

    Rank 0 creates the file (under /dev/shm where it exists), the ranks map it, and rank 0
    unlinks it once all have: the mapping outlives the name, and nothing is left behind if a
    process dies. `rounds` counts the rounds done, the same on every rank. A sum waits for the
    other ranks up to `timeout_s` (spinning ~100 us, then sleeping: a rank that waits for a dead
    or stopped peer leaves its core idle), then raises naming the rank that never came.
    """

    def __init__(self, group: dist.ProcessGroup, timeout_s: float, slot_bytes: int = SLOT_BYTES) -> None:
        if (why := shm_op_missing()) is not None:
            raise RuntimeError(f"shared-memory all-reduce: {why}")
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.timeout_s, self.rounds = timeout_s, 0
        self.failed: Optional[str] = None  # a failed sum leaves the ranks out of step for good
        nbytes = 64 * self.world + 2 * self.world * slot_bytes
        # [path, error]: rank 0 reserves the file's blocks up front, so a full /dev/shm (a
        # container's 64 MB default) fails here, on every rank alike, not as a SIGBUS mid-step
        made: list[Optional[str]] = [None, None]
        if self.rank == 0:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            fd, made[0] = tempfile.mkstemp(prefix="msrec_allreduce_", dir=folder)
            try:
                # zero-filled: every rank's round starts at 0 (ftruncate where there is no fallocate)
                (os.posix_fallocate(fd, 0, nbytes) if hasattr(os, "posix_fallocate") else os.ftruncate(fd, nbytes))
            except OSError as e:
                os.unlink(made[0])
                made = [None, f"cannot reserve {nbytes} bytes in {folder}: {e}"]
            finally:
                os.close(fd)
        dist.broadcast_object_list(made, src=dist.get_global_rank(group, 0), group=group)
        if made[0] is None:
            raise SharedMemoryUnavailable(f"shared-memory all-reduce: {made[1]}")
        try:
            self.region = torch.from_file(made[0], shared=True, size=nbytes, dtype=torch.uint8)
        finally:
            dist.barrier(group=group)
            if self.rank == 0:
                os.unlink(made[0])

    def __call__(self, t: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        if self.failed is not None:
            raise RuntimeError(f"shared-memory all-reduce: an earlier sum failed, the ranks are out of step: {self.failed}")
        work = t if t.is_contiguous() else t.contiguous()
        try:
            self.rounds = torch.ops.msrec.shm_all_reduce_sum_(work, self.region, self.rank, self.world, self.rounds,
                                                              self.timeout_s, divisor)
        except RuntimeError as e:
            self.failed = str(e).splitlines()[0]
            raise
        if work is not t:
            t.copy_(work)
        return t


# The host reducer of each process group, like torch.distributed's own registry of groups:
# all_reduce_sum_ picks it by group, for the loop's sums and for all_reduce_sum, the sum over
# ranks the model's partitioned norm is built with (model_parallel.build_train_module).
_HOST_REDUCERS: "weakref.WeakKeyDictionary[dist.ProcessGroup, SharedMemoryAllReduce]" = weakref.WeakKeyDictionary()
_SHM_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32)


def shm_op_missing() -> Optional[str]:
    """Why torch.ops.msrec.shm_all_reduce_sum_ cannot run here, or None (it loads with msrec_dist._C)."""
    from msrec_dist.kernels.native import CSRC_ERROR, HAVE_CSRC  # imports msrec_dist._C

    if not HAVE_CSRC:
        return f"msrec_dist._C is not built ({CSRC_ERROR})"
    if not hasattr(torch.ops.msrec, "shm_all_reduce_sum_"):
        return "msrec_dist._C has no shm_all_reduce_sum_ (built before csrc/shm_all_reduce.cpp: rebuild it)"
    return None


def host_id() -> str:
    """This machine, as the ranks of one host must agree on it (hostname and kernel boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def enable_host_reduce(mode: str, group: Optional[dist.ProcessGroup] = None, timeout_s: float = 300.0,
                       slot_bytes: int = SLOT_BYTES) -> bool:
    """Sum through shared memory in `group` (default: the world) from now on, where `mode`
    ('auto', 'shm', 'gloo') allows it and it can: gloo, more than one rank, all on this host
    (compared by host_id), the C++ extension built, the segment made; 'auto' also wants a core
    per rank (the ranks' allowed cores together at least as many as the ranks). 'shm' raises where
    it cannot; 'auto' keeps the exchange / dist.all_reduce then (with a warning if the segment failed). Collective: every rank of the group must call it. Returns
    whether shared memory is used."""
    if mode not in HOST_REDUCES:
        raise ValueError(f"host_reduce must be one of {HOST_REDUCES}, got {mode!r}")
    group = group or dist.group.WORLD
    _HOST_REDUCERS.pop(group, None)  # a new state's setting replaces the last one's
    if mode == "gloo" or dist.get_world_size(group) == 1 or dist.get_backend(group) != "gloo":
        if mode == "shm":
            raise ValueError(f"host_reduce 'shm' needs a gloo group of several ranks, got backend "
                             f"{dist.get_backend(group)!r} with {dist.get_world_size(group)} rank(s)")
        return False
    from msrec_dist.runtime import allowed_cores

    world = dist.get_world_size(group)
    hosts: list[Optional[tuple]] = [None] * world
    dist.all_gather_object(hosts, (host_id(), shm_op_missing(), allowed_cores()), group=group)
    missing = [f"rank {r}: {why}" for r, (_, why, _) in enumerate(hosts) if why]
    reason = ("the ranks are on several hosts" if len({h for h, _, _ in hosts}) > 1 else
              f"the C++ op is missing ({'; '.join(missing)})" if missing else None)
    if reason is not None:
        if mode == "shm":
            raise RuntimeError(f"host_reduce 'shm': {reason}")
        return False
    cores = set().union(*(set(c) for _, _, c in hosts))
    if mode == "auto" and len(cores) < world:
        # more ranks than cores: a rank spinning in its wait takes the core a late peer needs
        # (4 ple ranks on this 2-core machine, B=1024: shm/gloo samples/s 0.82-0.99 in 4 rounds)
        return False
    try:
        _HOST_REDUCERS[group] = SharedMemoryAllReduce(group, timeout_s, slot_bytes)
    except SharedMemoryUnavailable as e:
        if mode == "shm":
            raise
        warnings.warn(f"{e}; summing over gloo instead (train.host_reduce: auto)", stacklevel=2)
        return False
    return True


def disable_host_reduce(group: Optional[dist.ProcessGroup] = None) -> None:
    _HOST_REDUCERS.pop(group or dist.group.WORLD, None)


def all_reduce_sum_(t: torch.Tensor, group: Optional[dist.ProcessGroup] = None, divisor: int = 1) -> torch.Tensor:
    """Sum `t` over the ranks of `group` in place, divided by `divisor` (floating t; e.g. the world
    size for a mean): every rank gets the same values; returns `t`."""
    if divisor != 1 and not t.is_floating_point():
        raise ValueError(f"all_reduce_sum_: a divisor ({divisor}) needs a floating tensor, got {t.dtype}")
    world = dist.get_world_size(group)
    if world == 1:
        return t if divisor == 1 else t.div_(divisor)
    host = _HOST_REDUCERS.get(group or dist.group.WORLD)
    if host is not None and t.device.type == "cpu" and t.dtype in _SHM_DTYPES:
        return host(t, divisor)
    _sum_over_ranks_(t, group, world)
    return t if divisor == 1 else t.div_(divisor)


def _sum_over_ranks_(t: torch.Tensor, group: Optional[dist.ProcessGroup], world: int) -> None:
    """The sum through gloo's pairwise exchanges (world a power of two) or dist.all_reduce."""
    if not uses_exchange(group):
        dist.all_reduce(t, group=group)
        return
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
    """Differentiable sum of `t` over the default group's ranks (a new tensor): the `rank_sum`
    handed to the model in a world of several ranks (msrec_dist/model/star.py)."""
    return _AllReduceSum.apply(t)
