"""One training run, end to end, on however many ranks the launcher started.

    ExperimentConfig + DistContext
      ──load_data_config, validate_files (via make_dataloader)──► files checked before any step
      ──run_dir.prepare──► fresh / --resume / --overwrite checked before anything is written
      ──build_train_state, load_checkpoint──► DMP + optimizers (plan printed; then plan.json and
                                              config.json written, run.dir and data absolute)
        (--init-from instead of --resume: distributed/warm_start.init_from, its report printed and
        written to init_from.json)
      ──build_trainer (training/loop.py: plain or pipelined, chosen once)──►
      ──epochs of trainer.train_epoch (tqdm, TensorBoard loss, checkpoints every N steps and at
        the end; an exception writes {"event": "stopped"} to train_log.jsonl and stderr)──►
        with a val split, evaluations on it every train.eval_every steps or epoch and at the end
        (selection.py: the score, the best so far in checkpoints/best, early stopping)──►
      ──evaluate the best weights (or the last) on the eval split──► <run.dir>/final_metrics.json
        (train.stage=pretrain: no val evaluations; the contrastive loss on the eval split)
        (+ the selection, TensorBoard AUCs), eval_predictions.npz, model_weights.json (the CGC
        gates' mean weights per scenario and the mixing weights on the eval rows: inspect.py)

`run(cfg, ctx)` is what `msrec_dist/train.py` calls and what tests call without a subprocess.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from msrec_dist.config import ExperimentConfig
from msrec_dist.data.reader import make_dataloader, validate_files
from msrec_dist.data.scan import scan_splits
from msrec_dist.data.schema import load_data_config
from msrec_dist.distributed import warm_start
from msrec_dist.distributed.checkpoint import (Progress, best_checkpoint, latest_checkpoint, load_checkpoint,
                                               load_weights, read_progress, save_best, save_checkpoint)
from msrec_dist.distributed.collectives import all_reduce_sum_
from msrec_dist.distributed.context import DistContext
from msrec_dist.distributed.model_parallel import build_train_state
from msrec_dist.distributed.sharding import describe_plan, save_plan
from msrec_dist.metrics.evaluator import format_table
from msrec_dist.training.evaluate import evaluate, evaluate_loss
from msrec_dist.training.inspect import GateRecorder
from msrec_dist.training.loop import build_trainer, is_pipelined
from msrec_dist.training.run_dir import check_data, data_identity, prepare, truncate_log
from msrec_dist.training.selection import BestTracker, check_metric, score
from msrec_dist.typed_yaml import ConfigError, to_dict


def _writer(cfg: ExperimentConfig, ctx: DistContext, resumed_step: int | None):
    if not (ctx.is_main and cfg.run.tensorboard):
        return None
    from torch.utils.tensorboard import SummaryWriter

    # on resume, TensorBoard hides the killed run's events after the checkpoint's step
    purge = None if resumed_step is None else resumed_step + 1
    return SummaryWriter(os.path.join(cfg.run.dir, "tensorboard"), purge_step=purge)


def write_json_atomic(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def global_mean(value: torch.Tensor, ctx: DistContext) -> float:
    """Mean of a scalar over ranks (the global-batch loss when local batches are equal)."""
    if ctx.world_size == 1:
        return value.item()
    # the loop's own sum (shared memory where enabled): a peer that stops mid-training is then
    # reported by rank, where gloo's all_reduce only says that a recv timed out
    t = value.detach().reshape(1).to(torch.float64)
    return all_reduce_sum_(t, divisor=ctx.world_size).item()


def epoch_steps(loader, ctx: DistContext) -> int:
    """Steps in one epoch: the most batches any rank holds (ranks that run out train on empty
    batches until then). From Parquet metadata, no data read."""
    steps = torch.tensor([len(loader)], dtype=torch.long)
    if ctx.world_size > 1:
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
    return int(steps.item())


def global_sum(value: int, ctx: DistContext) -> int:
    t = torch.tensor([value], dtype=torch.long)
    if ctx.world_size > 1:
        all_reduce_sum_(t)
    return int(t.item())


def run(cfg: ExperimentConfig, ctx: DistContext, resume: bool = False, overwrite: bool = False,
        resume_on_changed_data: bool = False, init_from: str | None = None, init_optimizer: str = "auto") -> dict:
    """Train, evaluate, write the run directory; returns the final metrics dict (every rank).

    A fresh run refuses a run.dir that holds anything (RunDirError, nothing written) unless
    `overwrite` (the old contents are moved aside). With `resume`, training continues from the
    newest complete checkpoint in <run.dir>/checkpoints: weights, optimizers, schedule, RNG and
    row position; from step 0 (said on stderr) where there is none and no finished run. A resume on
    other data (files, sizes, row counts) is refused unless `resume_on_changed_data`.
    `init_from` (RUN_DIR[:best|latest|step_N], a fresh run only): start from the weights, and with
    `init_optimizer` keep the optimizer state, that match in that checkpoint (distributed/warm_start.py;
    the report goes to stdout and <run.dir>/init_from.json), then train from step 0.
    """
    cfg.run.dir = os.path.abspath(cfg.run.dir)  # once, here: config.json keeps absolute paths
    source = warm_start.check_source(init_from, init_optimizer, cfg.run.dir, resume) if init_from else None
    cfg.data = os.path.abspath(cfg.data)
    data = load_data_config(cfg.data)
    validate_files(data, data.eval + data.val)
    pretrain = cfg.train.stage == "pretrain"  # SASS's contrastive stage: no task metrics to select on
    eval_every = cfg.train.eval_every if data.val and not pretrain else 0  # no val split: no selection
    stop_cfg = cfg.train.early_stop
    check_metric(stop_cfg.metric, data.scenario.names, data.task_names)
    scan_splits(data, cfg.reader.scan, ctx.rank, ctx.world_size)  # every value of every split, before any step
    ckpt_root = os.path.join(cfg.run.dir, "checkpoints")
    resume_from = prepare(cfg.run.dir, resume, overwrite, ctx)
    identity = data_identity({"train": data.train, "val": data.val, "eval": data.eval})
    pos = Progress()
    if resume_from is not None:
        pos, saved_identity = read_progress(resume_from)
        check_data(saved_identity, identity, resume_from, resume_on_changed_data)
    global_batch = cfg.reader.batch_size * ctx.world_size
    steps_per_epoch = epoch_steps(make_dataloader(data, data.train, cfg.reader, ctx.rank, ctx.world_size), ctx)
    # Progress is in rows: the saved row position, in batches of this run's global batch
    start_batch = pos.start_batch(global_batch)
    pos.rows_in_epoch = start_batch * global_batch
    left = max(0, steps_per_epoch - start_batch) + steps_per_epoch * max(0, cfg.train.epochs - pos.epoch - 1)
    total_steps = pos.step + (left if pos.epoch < cfg.train.epochs else 0)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    tracker = BestTracker(stop_cfg.metric, stop_cfg.patience, stop_cfg.min_delta)
    if pos.selection:  # resumed: go on counting (an early-stopped run trains no further)
        for key, value in pos.selection.items():
            setattr(tracker, key, value)
        if tracker.stopped:
            total_steps = pos.step
    os.makedirs(cfg.run.dir, exist_ok=True)
    state = build_train_state(cfg, data, ctx, total_steps)
    if isinstance(eval_every, int) and eval_every > 0 and is_pipelined(state, ctx, cfg.train):
        # the pipeline holds batches in flight inside the model's forward; evaluating between its
        # steps would run the model outside it
        raise ConfigError(f"train.eval_every={eval_every} (steps) needs the plain loop: set train.pipeline=plain, "
                          "or evaluate at epoch ends (train.eval_every=epoch)")
    transfer = warm_start.init_from(state, source, ctx, init_optimizer, data) if source else None
    if resume_from is not None:
        pos = load_checkpoint(resume_from, state, ctx)
        pos.rows_in_epoch = start_batch * global_batch
        on_disk = best_checkpoint(ckpt_root)  # a best saved after the checkpoint resumed from stays best
        if on_disk is not None and on_disk[1]["metric"] == tracker.metric:
            tracker.adopt(on_disk[1]["step"], on_disk[1]["score"])
        if ctx.is_main:
            print(f"resumed from {resume_from} at step {pos.step}", flush=True)
    if ctx.is_main:
        print(describe_plan(state.plan), flush=True)
        if ctx.world_size > 1:
            print(f"sums over ranks: {'shared memory' if state.host_reduce else ctx.backend} "
                  f"(train.host_reduce={cfg.train.host_reduce}); embedding lookup: "
                  f"{'the tables kernel, called directly' if state.local_lookup else 'DMP'}", flush=True)
        # only now, after the start or the checkpoint load succeeded
        save_plan(state.plan, os.path.join(cfg.run.dir, "plan.json"))
        write_json_atomic(os.path.join(cfg.run.dir, "config.json"), to_dict(cfg))
        if transfer is not None:
            print(warm_start.format_report(transfer), flush=True)
            write_json_atomic(os.path.join(cfg.run.dir, "init_from.json"), transfer)
        if resume:
            truncate_log(os.path.join(cfg.run.dir, "train_log.jsonl"), pos.step)
    writer = _writer(cfg, ctx, pos.step if resume else None)
    bar = tqdm(total=total_steps, initial=pos.step, desc=f"train {cfg.model.name}",
               disable=not (ctx.is_main and cfg.run.progress), dynamic_ncols=True)
    train_log = open(os.path.join(cfg.run.dir, "train_log.jsonl"), "a") if ctx.is_main else None
    rows_log = open(os.path.join(cfg.run.dir, f"rows_rank{ctx.rank}.txt"), "a") if cfg.run.record_rows else None
    samples_before, local_samples = pos.samples, 0  # all ranks' samples up to the checkpoint; this rank's since
    clock = {"val_s": 0.0, "last_log": time.perf_counter(), "last_log_step": pos.step, "val_since_log": 0.0,
             "last_val_step": -1, "stop": False}

    def save() -> None:
        pos.samples = samples_before + global_sum(local_samples, ctx)
        pos.selection = tracker.state()
        save_checkpoint(ckpt_root, state, pos, ctx, cfg.train.keep_checkpoints, identity)

    def validate() -> None:
        """Evaluate on val at this step: log it, keep the best weights, decide on stopping."""
        t0 = time.perf_counter()
        val_loader = make_dataloader(data, data.val, cfg.reader, ctx.rank, ctx.world_size, device_type=ctx.device.type)
        metrics = evaluate(state, val_loader, data, ctx)
        value = score(metrics, tracker.metric)
        is_best, clock["stop"] = tracker.update(pos.step, value)
        clock["last_val_step"] = pos.step
        if is_best and cfg.train.keep_best:
            save_best(ckpt_root, state, ctx, {"step": pos.step, "epoch": pos.epoch, "metric": tracker.metric,
                                              "score": value, "val": metrics})
        if train_log is not None:
            train_log.write(json.dumps({"step": pos.step, "epoch": pos.epoch, "val": metrics, "metric": tracker.metric,
                                        "score": value, "best": is_best}) + "\n")
            if clock["stop"]:
                train_log.write(json.dumps({"event": "early_stop", "step": pos.step, "best_step": tracker.best_step,
                                            "best_score": tracker.best_score, "patience": tracker.patience}) + "\n")
            train_log.flush()
        if writer is not None:
            add_cells(writer, "val_auc", metrics, pos.step)
            if value is not None:
                writer.add_scalar(f"val/{tracker.metric}", value, pos.step)
        if ctx.is_main and clock["stop"]:
            print(f"early stop at step {pos.step}: {tracker.metric} has not improved for {tracker.patience} "
                  f"evaluations (best {tracker.best_score} at step {tracker.best_step})", flush=True)
        spent = time.perf_counter() - t0
        clock["val_s"] += spent
        clock["val_since_log"] += spent

    def on_step(_: int, loss: torch.Tensor, batch) -> bool:
        nonlocal local_samples
        pos.step += 1
        pos.rows_in_epoch += global_batch
        local_samples += batch.size
        bar.update(1)
        if rows_log is not None:
            rows_log.write("".join(f"{r}\n" for r in batch.rows.tolist()))
        if pos.step % cfg.train.log_every == 0 or pos.step == total_steps:
            value = global_mean(loss, ctx)  # host sync, only on logging steps
            bar.set_postfix(loss=f"{value:.4f}")
            now = time.perf_counter()  # samples/s of training alone: the val evaluations' time left out
            rate = ((pos.step - clock["last_log_step"]) * global_batch
                    / max(now - clock["last_log"] - clock["val_since_log"], 1e-9))
            clock.update(last_log=now, last_log_step=pos.step, val_since_log=0.0)
            if train_log is not None:
                # strict JSON: a non-finite loss (train.nan_policy=skip_batch) is written as null
                train_log.write(json.dumps({"step": pos.step, "loss": value if math.isfinite(value) else None,
                                            "samples_per_s": rate}) + "\n")
                train_log.flush()
            if writer is not None:
                writer.add_scalar("train/loss", value, pos.step)
                writer.add_scalar("train/dense_lr", state.scheduler.get_last_lr()[0], pos.step)
        if isinstance(eval_every, int) and eval_every > 0 and pos.step % eval_every == 0:
            validate()
        if cfg.train.checkpoint_every and pos.step % cfg.train.checkpoint_every == 0:
            save()
        return pos.step < total_steps and not clock["stop"]

    trainer = build_trainer(state, data, ctx, cfg.train)
    start = time.perf_counter()
    try:
        while pos.epoch < cfg.train.epochs and pos.step < total_steps:
            loader = make_dataloader(data, data.train, cfg.reader, ctx.rank, ctx.world_size,
                                     start_batch=pos.rows_in_epoch // global_batch, device_type=ctx.device.type,
                                     epoch=pos.epoch, seed=cfg.run.seed)  # the epoch's order (reader.shuffle)
            trainer.train_epoch(loader, on_step)
            if clock["stop"]:
                break  # early stop: the epoch stays where it is
            if pos.step < total_steps or pos.rows_in_epoch >= steps_per_epoch * global_batch:
                pos.epoch, pos.rows_in_epoch = pos.epoch + 1, 0
                if eval_every == "epoch" and pos.step < total_steps:
                    validate()
                    if clock["stop"]:
                        break
        if eval_every and clock["last_val_step"] != pos.step and not tracker.stopped and (
                pos.step > 0 or tracker.best_step < 0):
            validate()  # the last weights are a candidate too
        wall = time.perf_counter() - start - clock["val_s"]
        if (latest_checkpoint(ckpt_root) or "").rsplit("_", 1)[-1] != str(pos.step) or clock["val_s"]:
            save()  # always a model at the end (train.checkpoint_every=0: only there), with the selection
    except BaseException as e:
        stopped(cfg, ctx, pos.step, latest_checkpoint(ckpt_root), e, train_log)
        raise
    finally:
        bar.close()
        for log in (train_log, rows_log):
            if log is not None:
                log.close()
    trained = global_sum(local_samples, ctx)  # samples trained in this process, all ranks
    selection = None
    best = best_checkpoint(ckpt_root) if eval_every and cfg.train.keep_best else None
    if best is not None:
        load_weights(best[0], state)  # the eval split is scored with the weights chosen on val
        selection = {k: best[1][k] for k in ("metric", "step", "score", "val")}
    elif eval_every and tracker.best_step >= 0:
        selection = {"metric": tracker.metric, "step": tracker.best_step, "score": tracker.best_score, "val": None}
    eval_loader = make_dataloader(data, data.eval, cfg.reader, ctx.rank, ctx.world_size, device_type=ctx.device.type)
    predictions: list = []
    if pretrain:  # the contrastive loss on the eval rows in place of the tasks' metrics
        metrics, weights = {"stage": "pretrain", "eval_loss": evaluate_loss(state, eval_loader, data, ctx)}, None
    else:
        with GateRecorder(state.model, data.scenario.names, data.task_names) as gates:  # the report's heatmaps
            metrics = evaluate(state, eval_loader, data, ctx, predictions if cfg.run.eval_predictions else None)
        weights = gates.summary(ctx.world_size)
    if cfg.run.eval_predictions and not pretrain:
        write_predictions(os.path.join(cfg.run.dir, "eval_predictions.npz"), predictions, data, ctx)
    result = {
        "model": cfg.model.name,
        "steps": pos.step,
        "evaluated_step": selection["step"] if best is not None else pos.step,  # the weights eval was scored with
        "selection": selection,  # null without a val split (train.eval_every 0 or no val: files)
        "early_stopped": tracker.stopped,
        "val_s": clock["val_s"],  # time spent evaluating on val during training (not in wall_s)
        "train_samples": samples_before + trained,  # all ranks, resumed parts included
        "wall_s": wall,  # this process's training time
        "train_samples_per_s": trained / wall if wall > 0 else 0.0,  # this process's samples / wall_s
        "world_size": ctx.world_size,
        "host_reduce": state.host_reduce,  # the sums over ranks went through shared memory
        "local_lookup": state.local_lookup,  # the embedding called the tables' kernel directly
        **metrics,
    }
    if ctx.is_main:
        write_json_atomic(os.path.join(cfg.run.dir, "final_metrics.json"), result)
        if weights is not None:
            write_json_atomic(os.path.join(cfg.run.dir, "model_weights.json"), weights)
        if writer is not None:
            if not pretrain:
                add_cells(writer, "eval_auc", metrics, pos.step)
            writer.close()
        print(f"eval contrastive loss {metrics['eval_loss']:.4f}" if pretrain else format_table(metrics), flush=True)
    return result


def add_cells(writer, prefix: str, metrics: dict, step: int) -> None:
    """Each scenario × task AUC as a TensorBoard scalar <prefix>/<scenario>/<task>."""
    for scen, tasks in metrics["per_scenario"].items():
        for task, cell in tasks.items():
            if cell["auc"] is not None:  # None: undefined (one class or no rows)
                writer.add_scalar(f"{prefix}/{scen}/{task}", cell["auc"], step)


def write_predictions(path: str, predictions: list, data, ctx: DistContext) -> None:
    """Every rank's eval predictions into one .npz on rank 0: scores [N, T] (probabilities),
    labels [N, T], scenario [N], rows [N] (each row's position in the split's sorted files: the
    `row` of python -m msrec_dist.predict), task_names, scenario_names. Rows in rank order, each
    rank's in its read order."""
    import numpy as np

    local = tuple(torch.cat(parts).numpy() if parts else None for parts in zip(*predictions)) or (None,) * 4
    parts = [local]
    if ctx.world_size > 1:
        parts = [None] * ctx.world_size
        torch.distributed.all_gather_object(parts, local)
    if not ctx.is_main:
        return
    kept = [p for p in parts if p[0] is not None]
    T = len(data.task_names)
    scores, labels, scenario, rows = ((np.concatenate([p[i] for p in kept]) if kept else np.zeros((0, T) if i < 2 else 0))
                                      for i in range(4))
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, scores=scores.astype(np.float32), labels=labels.astype(np.float32), scenario=scenario.astype(np.int64),
             rows=rows.astype(np.int64), task_names=np.array(data.task_names),
             scenario_names=np.array(data.scenario.names))
    os.replace(tmp, path)


def stopped(cfg: ExperimentConfig, ctx: DistContext, step: int, checkpoint: str | None, error: BaseException,
            train_log) -> None:
    """Say where a failed run stopped: stderr (every rank) and train_log.jsonl (rank 0). The
    checkpoints stay as they were: none is written after a failure."""
    what = f"{type(error).__name__}: {error}".strip()
    print(f"rank {ctx.rank}: training stopped at step {step}; last complete checkpoint: {checkpoint} "
          f"(--resume continues from it): {what}", file=sys.stderr, flush=True)
    if train_log is not None and not train_log.closed:
        train_log.write(json.dumps({"event": "stopped", "step": step, "checkpoint": checkpoint,
                                    "error": what[:2000]}) + "\n")
        train_log.flush()
