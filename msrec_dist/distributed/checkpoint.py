"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically.

    <run.dir>/checkpoints/step_N/          complete checkpoints (DCP files + .metadata)
    <run.dir>/checkpoints/.tmp_step_N/     being written; renamed to step_N by rank 0 only
                                           after every rank finished (barrier)
    state = {model: DMP state dict (ShardedTensors), optim: sparse (fused) + dense optimizer,
             progress: [step, epoch, batch_in_epoch, global_batch, samples], rng.rank<r>}

A kill during a save leaves only a .tmp_ directory, which `latest_checkpoint` never returns.
Loading through DCP reshards, so a checkpoint saved on 2 ranks loads on 1. The reader restarts
at `batch_in_epoch`, a global batch index that means the same rows for any world size.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from msrec_dist.distributed.context import DistContext
from msrec_dist.distributed.model_parallel import TrainState

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # global batches of that epoch already trained on
    global_batch: int = 0  # rows per global batch when saved (to resume on another world size)
    samples: int = 0  # samples this rank trained on

    def rebatch(self, global_batch: int) -> "Progress":
        """The same global row position in batches of `global_batch` rows (rounded down)."""
        if self.global_batch and self.global_batch != global_batch:
            self.batch_in_epoch = self.batch_in_epoch * self.global_batch // global_batch
        self.global_batch = global_batch
        return self


def checkpoint_dirs(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, ".metadata")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1][1] if dirs else None


_PROGRESS_FIELDS = [f.name for f in fields(Progress)]


def _state(state: TrainState, progress: Progress, rank: int) -> dict:
    # progress as one int64 tensor: DCP handles tensors uniformly across ranks. The LR
    # schedule is a pure function of the step (optimizer param_groups carry the current lr).
    return {
        "model": state.model.state_dict(),
        "optim": state.optimizer.state_dict(),
        "progress": torch.tensor([getattr(progress, f) for f in _PROGRESS_FIELDS], dtype=torch.long),
        f"rng.rank{rank}": torch.get_rng_state(),
    }


def save_checkpoint(root: str, state: TrainState, progress: Progress, ctx: DistContext, keep: int) -> str:
    """Write step_<progress.step> atomically; keep the newest `keep` complete checkpoints."""
    final = os.path.join(root, f"step_{progress.step}")
    tmp = os.path.join(root, f".tmp_step_{progress.step}")
    if ctx.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(_state(state, progress, ctx.rank), checkpoint_id=tmp)
    dist.barrier()  # every rank's shard is on disk
    if ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, state: TrainState, ctx: DistContext) -> Progress:
    """Load model, optimizers, scheduler and progress (resharding as needed); returns progress."""
    saved_keys = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    # Adam creates its moments at its first step; DCP loads in place only the keys the state dict
    # has, so without them a resumed run restarted the dense optimizer from zero moments. A step
    # on zero gradients creates them (the weights it could touch are loaded right after).
    state.dense_optimizer.init_state()
    full = _state(state, Progress(), ctx.rank)
    rng_key = f"rng.rank{ctx.rank}"
    if not any(k == rng_key or k.startswith(rng_key + ".") for k in saved_keys):
        full.pop(rng_key)  # world size changed: this rank had no RNG state saved
    dcp.load(full, checkpoint_id=path)
    state.model.load_state_dict(full["model"])
    state.optimizer.load_state_dict(full["optim"])
    if rng_key in full:
        torch.set_rng_state(full[rng_key])
    progress = Progress(**dict(zip(_PROGRESS_FIELDS, full["progress"].tolist())))
    restore_schedule(state.scheduler, progress.step)
    return progress


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """The LambdaLR schedule after `step` optimizer steps: its counter and the learning rate in
    every param group, which the next step uses (the optimizers' state dicts carry no
    param_groups, so without this the first resumed step ran at the schedule's step-0 rate)."""
    scheduler.last_epoch = step
    scheduler._step_count = step + 1
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
