"""The run directory's contract: what a fresh run, --resume and --overwrite find and do there.

    <run.dir>/config.json, plan.json   written after a successful start or checkpoint load
              train_log.jsonl          {"step", "loss"} lines; on resume cut back to the checkpoint's
                                       step; {"event": "stopped", ...} where a run failed
              tensorboard/             events; a resume hides the events after the checkpoint's step
              checkpoints/step_N/      DCP files + progress.json (progress in rows, data identity)
              final_metrics.json       strict JSON (null for undefined values), at the end

`prepare(run_dir, resume, overwrite, ctx)` decides on rank 0 and tells every rank the same answer
before anything is written: a fresh run refuses a run.dir that holds anything; --overwrite first
moves the old contents aside to <run.dir>.replaced-<time>; --resume returns the newest complete
checkpoint, or None (then training starts at step 0, said on stderr) where the directory holds no
checkpoint and no finished run.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pyarrow.parquet as pq
import torch.distributed as dist

from msrec_dist.distributed.checkpoint import latest_checkpoint


class RunDirError(RuntimeError):
    """The run directory does not allow what was asked (nothing was written)."""


def _agree(ctx, decide):
    """Rank 0's answer (a value, or a RunDirError's message) on every rank."""
    answer = [None]
    if ctx.is_main:
        try:
            answer = [("ok", decide())]
        except RunDirError as e:
            answer = [("error", str(e))]
    if dist.is_initialized() and ctx.world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise RunDirError(value)
    return value


def prepare(run_dir: str, resume: bool, overwrite: bool, ctx) -> str | None:
    """Check run_dir (absolute) for a fresh run / --resume / --overwrite; returns the checkpoint
    to resume from, or None to train from step 0. Raises RunDirError with what to do instead."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: --resume continues the run in "
                          f"{run_dir}, --overwrite moves it aside and starts a new one")

    def decide() -> str | None:
        entries = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
        if resume:
            path = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
            if path is None and "final_metrics.json" in entries:
                raise RunDirError(f"--resume: {run_dir} holds a finished run (final_metrics.json) but no "
                                  "complete checkpoint to resume from; nothing was written. Start a new run "
                                  "with a new run.dir or --overwrite")
            if path is None:
                print(f"--resume: no complete checkpoint in {os.path.join(run_dir, 'checkpoints')}: "
                      "training from step 0", file=sys.stderr, flush=True)
            return path
        if entries and not overwrite:
            shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
            raise RunDirError(f"run.dir {run_dir} is not empty ({shown}); nothing was written. To continue "
                              "that run: --resume. To start a new one: another run.dir (--set run.dir=...) "
                              "or --overwrite (moves the old contents aside to "
                              f"{run_dir}.replaced-<time>)")
        if entries:
            aside = f"{run_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(run_dir, aside)
            print(f"--overwrite: moved the previous contents of {run_dir} to {aside}", file=sys.stderr, flush=True)
        return None

    return _agree(ctx, decide)


def data_identity(splits: dict[str, list[str]]) -> dict:
    """What the position in a checkpoint refers to: each file's path, size and row count (Parquet
    metadata only)."""
    def describe(files):
        return [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "rows": pq.ParquetFile(p).metadata.num_rows}
                for p in files]

    return {split: describe(files) for split, files in splits.items()}


def identity_changes(saved: dict, now: dict) -> list[str]:
    """What differs between the data a checkpoint was trained on and the data given now."""
    out = []
    for split in sorted(set(saved) | set(now)):
        old = {f["path"]: f for f in saved.get(split, [])}
        new = {f["path"]: f for f in now.get(split, [])}
        out += [f"{split}: {p} is gone" for p in sorted(set(old) - set(new))]
        out += [f"{split}: {p} is new" for p in sorted(set(new) - set(old))]
        for p in sorted(set(old) & set(new)):
            for key in ("rows", "bytes"):
                if old[p][key] != new[p][key]:
                    out.append(f"{split}: {p}: {key} {old[p][key]} -> {new[p][key]}")
    return out


def check_data(saved: dict | None, now: dict, checkpoint: str, allow_change: bool) -> None:
    changes = identity_changes(saved or {}, now) if saved is not None else []
    if not changes:
        return
    listed = "\n  ".join(changes)
    if not allow_change:
        raise RunDirError(f"--resume: the data differ from those {checkpoint} was trained on; the saved row "
                          f"position would point at other rows. Nothing was written.\n  {listed}\n"
                          "Pass --resume-on-changed-data to continue at the saved row position anyway")
    print(f"--resume-on-changed-data: continuing at the saved row position on changed data:\n  {listed}",
          file=sys.stderr, flush=True)


def truncate_log(path: str, step: int) -> None:
    """Keep the lines of train_log.jsonl up to `step` (the checkpoint resumed from); a line cut by a
    kill, and every line after `step`, goes."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
