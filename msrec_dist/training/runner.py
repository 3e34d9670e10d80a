"""One training run, end to end, on however many ranks the launcher started.

    ExperimentConfig + DistContext
      ──load_data_config, validate_files (via make_dataloader)──► files checked before any step
      ──build_train_state──► DMP + optimizers (plan printed, saved to <run.dir>/plan.json)
      ──build_trainer (training/loop.py: plain or pipelined, chosen once)──►
      ──epochs of trainer.train_epoch (tqdm, TensorBoard loss, checkpoints)──►
      ──evaluate on the eval split──► <run.dir>/final_metrics.json (+ TensorBoard AUCs)

`run(cfg, ctx)` is what `msrec_dist/train.py` calls and what tests call without a subprocess.
"""
from __future__ import annotations

import json
import os
import time

import torch
from tqdm import tqdm

from msrec_dist.config import ExperimentConfig
from msrec_dist.data.reader import make_dataloader, validate_files
from msrec_dist.data.scan import scan_splits
from msrec_dist.data.schema import load_data_config
from msrec_dist.distributed.checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from msrec_dist.distributed.context import DistContext
from msrec_dist.distributed.model_parallel import build_train_state
from msrec_dist.distributed.sharding import describe_plan, save_plan
from msrec_dist.metrics.evaluator import format_table
from msrec_dist.training.evaluate import evaluate
from msrec_dist.training.loop import build_trainer
from msrec_dist.typed_yaml import to_dict


def _writer(cfg: ExperimentConfig, ctx: DistContext):
    if not (ctx.is_main and cfg.run.tensorboard):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(cfg.run.dir, "tensorboard"))


def write_json_atomic(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def global_mean(value: torch.Tensor, ctx: DistContext) -> float:
    """Mean of a scalar over ranks (the global-batch loss when local batches are equal)."""
    if ctx.world_size == 1:
        return value.item()
    t = value.detach().reshape(1).to(torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / ctx.world_size


def epoch_steps(loader, ctx: DistContext) -> int:
    """Steps in one epoch: the most batches any rank holds (ranks that run out train on empty
    batches until then). From Parquet metadata, no data read."""
    steps = torch.tensor([len(loader)], dtype=torch.long)
    if ctx.world_size > 1:
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
    return int(steps.item())


def run(cfg: ExperimentConfig, ctx: DistContext, resume: bool = False) -> dict:
    """Train, evaluate, write the run directory; returns the final metrics dict (every rank).

    With `resume`, training continues from the newest complete checkpoint in
    <run.dir>/checkpoints (if any): weights, optimizers, schedule, RNG and reader position.
    """
    data = load_data_config(cfg.data)
    validate_files(data, data.eval)
    scan_splits(data, cfg.reader.scan, ctx.rank, ctx.world_size)  # every value of both splits, before any step
    global_batch = cfg.reader.batch_size * ctx.world_size
    steps_per_epoch = epoch_steps(make_dataloader(data, data.train, cfg.reader, ctx.rank, ctx.world_size), ctx)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    os.makedirs(cfg.run.dir, exist_ok=True)
    state = build_train_state(cfg, data, ctx, total_steps)
    if ctx.is_main:
        print(describe_plan(state.plan), flush=True)
        if ctx.world_size > 1:
            print(f"sums over ranks: {'shared memory' if state.host_reduce else ctx.backend} "
                  f"(train.host_reduce={cfg.train.host_reduce}); embedding lookup: "
                  f"{'the tables kernel, called directly' if state.local_lookup else 'DMP'}", flush=True)
        save_plan(state.plan, os.path.join(cfg.run.dir, "plan.json"))
        write_json_atomic(os.path.join(cfg.run.dir, "config.json"), to_dict(cfg))
    ckpt_root = os.path.join(cfg.run.dir, "checkpoints")
    pos = Progress(global_batch=global_batch)
    if resume and (path := latest_checkpoint(ckpt_root)) is not None:
        pos = load_checkpoint(path, state, ctx).rebatch(global_batch)
        if ctx.is_main:
            print(f"resumed from {path} at step {pos.step}", flush=True)
    writer = _writer(cfg, ctx)
    bar = tqdm(total=total_steps, initial=pos.step, desc=f"train {cfg.model.name}",
               disable=not (ctx.is_main and cfg.run.progress), dynamic_ncols=True)
    train_log = open(os.path.join(cfg.run.dir, "train_log.jsonl"), "a") if ctx.is_main else None
    rows_log = open(os.path.join(cfg.run.dir, f"rows_rank{ctx.rank}.txt"), "a") if cfg.run.record_rows else None

    def on_step(_: int, loss: torch.Tensor, batch) -> bool:
        pos.step += 1
        pos.batch_in_epoch += 1
        pos.samples += batch.size
        bar.update(1)
        if rows_log is not None:
            rows_log.write("".join(f"{r}\n" for r in batch.rows.tolist()))
        if pos.step % cfg.train.log_every == 0 or pos.step == total_steps:
            value = global_mean(loss, ctx)  # host sync, only on logging steps
            bar.set_postfix(loss=f"{value:.4f}")
            if train_log is not None:
                train_log.write(json.dumps({"step": pos.step, "loss": value}) + "\n")
                train_log.flush()
            if writer is not None:
                writer.add_scalar("train/loss", value, pos.step)
                writer.add_scalar("train/dense_lr", state.scheduler.get_last_lr()[0], pos.step)
        if cfg.train.checkpoint_every and pos.step % cfg.train.checkpoint_every == 0:
            save_checkpoint(ckpt_root, state, pos, ctx, cfg.train.keep_checkpoints)
        return pos.step < total_steps

    trainer = build_trainer(state, data, ctx, cfg.train)
    start = time.perf_counter()
    while pos.epoch < cfg.train.epochs and pos.step < total_steps:
        loader = make_dataloader(data, data.train, cfg.reader, ctx.rank, ctx.world_size,
                                 start_batch=pos.batch_in_epoch, device_type=ctx.device.type)
        trainer.train_epoch(loader, on_step)
        if pos.step < total_steps or pos.batch_in_epoch >= steps_per_epoch:
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
    wall = time.perf_counter() - start
    bar.close()
    for log in (train_log, rows_log):
        if log is not None:
            log.close()
    if cfg.train.checkpoint_every and (latest_checkpoint(ckpt_root) or "").rsplit("_", 1)[-1] != str(pos.step):
        save_checkpoint(ckpt_root, state, pos, ctx, cfg.train.keep_checkpoints)
    samples_t = torch.tensor([pos.samples], dtype=torch.long)
    if ctx.world_size > 1:
        torch.distributed.all_reduce(samples_t)
    eval_loader = make_dataloader(data, data.eval, cfg.reader, ctx.rank, ctx.world_size, device_type=ctx.device.type)
    metrics = evaluate(state, eval_loader, data, ctx)
    result = {
        "model": cfg.model.name,
        "steps": pos.step,
        "train_samples": int(samples_t.item()),
        "wall_s": wall,
        "train_samples_per_s": int(samples_t.item()) / wall if wall > 0 else 0.0,
        "world_size": ctx.world_size,
        "host_reduce": state.host_reduce,  # the sums over ranks went through shared memory
        "local_lookup": state.local_lookup,  # the embedding called the tables' kernel directly
        **metrics,
    }
    if ctx.is_main:
        write_json_atomic(os.path.join(cfg.run.dir, "final_metrics.json"), result)
        if writer is not None:
            for scen, tasks in metrics["per_scenario"].items():
                for task, cell in tasks.items():
                    writer.add_scalar(f"eval_auc/{scen}/{task}", cell["auc"], pos.step)
            writer.close()
        print(format_table(metrics), flush=True)
    return result
