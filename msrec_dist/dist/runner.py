"""One training run, end to end, on however many ranks the launcher started.

    ExperimentConfig + DistContext
      ──load_data_config / validate_files──► files checked before any step
      ──build_train_state──► DMP + optimizers (plan printed, saved to <run.dir>/plan.json)
      ──epochs of train_epoch (tqdm, TensorBoard loss, checkpoints)──►
      ──evaluate on the eval split──► <run.dir>/final_metrics.json (+ TensorBoard AUCs)

`run(cfg, ctx)` is what `msrec_dist/train.py` calls and what tests call without a subprocess.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
from tqdm import tqdm

from msrec_dist.config import ExperimentConfig
from msrec_dist.data.reader import make_dataloader, validate_files
from msrec_dist.data.schema import load_data_config
from msrec_dist.dist.context import DistContext
from msrec_dist.dist.loop import evaluate, train_epoch
from msrec_dist.dist.model_parallel import build_train_state
from msrec_dist.dist.sharding import describe_plan, save_plan
from msrec_dist.metrics.evaluator import format_table
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


def run(cfg: ExperimentConfig, ctx: DistContext) -> dict:
    """Train, evaluate, write the run directory; returns the final metrics dict (every rank)."""
    data = load_data_config(cfg.data)
    train_index = validate_files(data, data.train)
    validate_files(data, data.eval)
    global_batch = cfg.reader.batch_size * ctx.world_size
    steps_per_epoch = math.ceil(train_index.total / global_batch)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    os.makedirs(cfg.run.dir, exist_ok=True)
    state = build_train_state(cfg, data, ctx, total_steps)
    if ctx.is_main:
        print(describe_plan(state.plan), flush=True)
        save_plan(state.plan, os.path.join(cfg.run.dir, "plan.json"))
        write_json_atomic(os.path.join(cfg.run.dir, "config.json"), to_dict(cfg))
    writer = _writer(cfg, ctx)
    progress = tqdm(total=total_steps, desc=f"train {cfg.model.name}", disable=not (ctx.is_main and cfg.run.progress),
                    dynamic_ncols=True)
    step, samples = 0, 0

    def on_step(_: int, loss: torch.Tensor, batch) -> bool:
        nonlocal step, samples
        step += 1
        samples += batch.size
        progress.update(1)
        if step % cfg.train.log_every == 0 or step == total_steps:
            value = loss.item()  # host sync, only on logging steps
            progress.set_postfix(loss=f"{value:.4f}")
            if writer is not None:
                writer.add_scalar("train/loss", value, step)
                writer.add_scalar("train/dense_lr", state.scheduler.get_last_lr()[0], step)
        return step < total_steps

    start = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        loader = make_dataloader(data, data.train, cfg.reader, ctx.rank, ctx.world_size)
        train_epoch(state, loader, data, ctx, cfg.train.grad_clip, on_step)
        if step >= total_steps:
            break
    wall = time.perf_counter() - start
    progress.close()
    samples_t = torch.tensor([samples], dtype=torch.long)
    if ctx.world_size > 1:
        torch.distributed.all_reduce(samples_t)
    eval_loader = make_dataloader(data, data.eval, cfg.reader, ctx.rank, ctx.world_size)
    metrics = evaluate(state, eval_loader, data, ctx)
    result = {
        "model": cfg.model.name,
        "steps": step,
        "train_samples": int(samples_t.item()),
        "wall_s": wall,
        "train_samples_per_s": int(samples_t.item()) / wall if wall > 0 else 0.0,
        "world_size": ctx.world_size,
        **metrics,
    }
    if ctx.is_main:
        write_json_atomic(os.path.join(cfg.run.dir, "final_metrics.json"), result)
        if writer is not None:
            for scen, tasks in metrics["per_scenario"].items():
                for task, cell in tasks.items():
                    writer.add_scalar(f"eval_auc/{scen}/{task}", cell["auc"], step)
            writer.close()
        print(format_table(metrics), flush=True)
    return result
