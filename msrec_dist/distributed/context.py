"""Process group and device: the only place (with train.py) that reads the launcher's env.

    torchrun / torchx dist.ddp set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_*
    init_distributed() ──► DistContext(rank, world_size, local_rank, local_world_size, device, backend)

Backend and device come from the machine: nccl + cuda:<local_rank> when GPUs exist, gloo + cpu
otherwise. A plain `python msrec_dist/train.py` (no launcher env) becomes a world of one on a
free local port, so one code path serves 1 and N ranks.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    timeout_s: float = 300.0  # the process group's; the shared-memory sums wait as long

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(env: Mapping[str, str] | None = None, timeout_s: float = 300.0) -> DistContext:
    """Initialise the default process group from launcher variables (or a world of one)."""
    env = os.environ if env is None else env
    rank = int(env.get("RANK", 0))
    world_size = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        if "MASTER_ADDR" in env:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        else:
            store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
            dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank, local_world_size, device, backend, timeout_s)


def timed_out_waiting(e: BaseException) -> bool:
    """Whether `e` is gloo's timeout of a collective, send or recv: a peer stopped, hung or fell
    behind by more than the process group's timeout. (The shared-memory sums name the late rank
    themselves: msrec_dist.distributed.collectives.)"""
    return isinstance(e, RuntimeError) and "Timed out waiting" in str(e)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
