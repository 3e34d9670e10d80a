"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically.

    <run.dir>/checkpoints/step_N/          complete checkpoints (DCP files + .metadata)
    <run.dir>/checkpoints/.tmp_step_N/     being written; renamed to step_N by rank 0 only
                                           after every rank finished (barrier)
    state = {model: DMP state dict (ShardedTensors), optim: sparse (fused) + dense optimizer,
             rng.rank<r>}
    step_N/progress.json: {"progress": Progress (in rows), "data": what the rows are (files,
                          sizes, row counts)}, written by rank 0 into .tmp_step_N
    <run.dir>/checkpoints/best/            the best weights on val (model only, DCP) + best.json
                                           ({step, metric, score, val}); replaced atomically

Every file and the directory are fsynced before the rename that publishes step_N, the parent after
it. A kill during a save leaves only a .tmp_ directory, which `latest_checkpoint` never returns.
Loading through DCP reshards, so a checkpoint saved on 2 ranks loads on 1. Progress is counted in
rows (rows of the epoch trained on, samples over all ranks), so it means the same for any global
batch (batch size x world size). Checkpoints written before progress.json existed do not load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from msrec_dist.distributed.context import DistContext
from msrec_dist.distributed.model_parallel import TrainState

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done (of whatever global batch each had)
    epoch: int = 0  # epoch in progress
    rows_in_epoch: int = 0  # rows of that epoch already trained on (all ranks)
    samples: int = 0  # samples trained on so far, all ranks together
    selection: dict | None = None  # model selection's state (training/selection.py BestTracker.state())

    def start_batch(self, global_batch: int) -> int:
        """The global batch (of `global_batch` rows) to restart the epoch at: the saved row position,
        rounded down to a whole batch (a batch-size change may train up to a batch of rows again)."""
        return self.rows_in_epoch // global_batch


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


PROGRESS_FILE = "progress.json"


def _state(state: TrainState, rank: int) -> dict:
    # The LR schedule is a pure function of the step (optimizer param_groups carry the current lr).
    return {
        "model": state.model.state_dict(),
        "optim": state.optimizer.state_dict(),
        f"rng.rank{rank}": torch.get_rng_state(),
    }


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file under root, then every directory (deepest first)."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(here)
        for name in files:
            _fsync(os.path.join(here, name))
    for here in reversed(dirs):
        _fsync(here)


def save_checkpoint(root: str, state: TrainState, progress: Progress, ctx: DistContext, keep: int,
                    data: dict | None = None) -> str:
    """Write step_<progress.step> atomically (fsynced, then renamed); keep the newest `keep`
    complete checkpoints. `data`: the data identity saved with the progress."""
    final = os.path.join(root, f"step_{progress.step}")
    tmp = os.path.join(root, f".tmp_step_{progress.step}")
    if ctx.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(_state(state, ctx.rank), checkpoint_id=tmp)
    dist.barrier()  # every rank's shard is on disk
    if ctx.is_main:
        with open(os.path.join(tmp, PROGRESS_FILE), "w") as f:
            json.dump({"progress": asdict(progress), "data": data}, f, indent=1)
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(root)
        for _, old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_progress(path: str) -> tuple[Progress, dict | None]:
    """The progress and data identity saved in checkpoint `path` (no collective)."""
    file = os.path.join(path, PROGRESS_FILE)
    if not os.path.exists(file):
        raise RuntimeError(f"{path} has no {PROGRESS_FILE}: it was written before progress was counted in rows "
                           "and cannot be resumed; start a new run")
    with open(file) as f:
        saved = json.load(f)
    return Progress(**saved["progress"]), saved.get("data")


def load_checkpoint(path: str, state: TrainState, ctx: DistContext) -> Progress:
    """Load model, optimizers, scheduler and progress (resharding as needed); returns progress."""
    progress, _ = read_progress(path)
    saved_keys = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    # Adam creates its moments at its first step; DCP loads in place only the keys the state dict
    # has, so without them a resumed run restarted the dense optimizer from zero moments. A step
    # on zero gradients creates them (the weights it could touch are loaded right after).
    state.dense_optimizer.init_state()
    full = _state(state, ctx.rank)
    rng_key = f"rng.rank{ctx.rank}"
    if not any(k == rng_key or k.startswith(rng_key + ".") for k in saved_keys):
        full.pop(rng_key)  # world size changed: this rank had no RNG state saved
    dcp.load(full, checkpoint_id=path)
    state.model.load_state_dict(full["model"])
    state.optimizer.load_state_dict(full["optim"])
    if rng_key in full:
        torch.set_rng_state(full[rng_key])
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


BEST_DIR, BEST_FILE = "best", "best.json"


def save_best(root: str, state: TrainState, ctx: DistContext, info: dict) -> str:
    """Write the model's weights (no optimizer) to root/best with `info` in best.json, replacing
    the previous best only once the new one is complete: .tmp_best is written and fsynced, the old
    best is renamed to .old_best, the new one into place, then the old one removed (a kill in
    between leaves .old_best, which best_checkpoint falls back to)."""
    final, tmp, old = (os.path.join(root, n) for n in (BEST_DIR, f".tmp_{BEST_DIR}", f".old_{BEST_DIR}"))
    if ctx.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": state.model.state_dict()}, checkpoint_id=tmp)
    dist.barrier()
    if ctx.is_main:
        with open(os.path.join(tmp, BEST_FILE), "w") as f:
            json.dump(info, f, indent=1)
        fsync_tree(tmp)
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def best_checkpoint(root: str) -> tuple[str, dict] | None:
    """(path, best.json) of the best weights under root, or None (no collective)."""
    for name in (BEST_DIR, f".old_{BEST_DIR}"):
        path = os.path.join(root, name)
        if os.path.exists(os.path.join(path, BEST_FILE)) and os.path.exists(os.path.join(path, ".metadata")):
            with open(os.path.join(path, BEST_FILE)) as f:
                return path, json.load(f)
    return None


def load_weights(path: str, state: TrainState) -> None:
    """Load the model weights of a checkpoint (step_N or best), resharding as needed; the
    optimizers and the schedule stay as they are."""
    full = {"model": state.model.state_dict()}
    dcp.load(full, checkpoint_id=path)
    state.model.load_state_dict(full["model"])
