"""Evaluation: global per scenario × task metrics over a split, the same dict on every rank (and
the mean loss over a split, for the pre-training stage).

    agreed batches (agreement.py) ──model.eval() forward──► logits [B, tasks], labels [B, tasks]
      ──ScenarioTaskMetrics.update (by batch.scenario [B])──► compute(): synced over ranks
"""
from __future__ import annotations

import torch

from msrec_dist.data.schema import DataConfig
from msrec_dist.distributed.collectives import all_reduce_sum_
from msrec_dist.distributed.context import DistContext
from msrec_dist.distributed.model_parallel import TrainState
from msrec_dist.metrics.evaluator import ScenarioTaskMetrics
from msrec_dist.training.agreement import agreed_batches


@torch.no_grad()
def evaluate(state: TrainState, loader, data: DataConfig, ctx: DistContext, predictions: list | None = None) -> dict:
    """Global per scenario × task metrics over the loader's split (every rank gets the same dict).
    `predictions`: a list to append this rank's (probabilities [B, T], labels [B, T], scenario [B],
    rows [B]) to, per batch (CPU tensors)."""
    metrics = ScenarioTaskMetrics(data.scenario.names, data.task_names).to(ctx.device)
    state.model.eval()
    for batch, _ in agreed_batches(loader, data, ctx):
        _, (_, logits, labels) = state.model(batch)
        metrics.update(logits, labels, batch.scenario)
        if predictions is not None and batch.size:
            predictions.append((torch.sigmoid(logits.float()).cpu(), labels.cpu(), batch.scenario.cpu(),
                                batch.rows.cpu()))
    state.model.train()
    return metrics.compute()


@torch.no_grad()
def evaluate_loss(state: TrainState, loader, data: DataConfig, ctx: DistContext) -> float:
    """The train module's loss averaged over the split's rows, all ranks (SASS's pre-training
    stage, whose loss is its only measure)."""
    total = torch.zeros(2, dtype=torch.float64)  # [Σ loss × rows, rows]
    state.model.eval()
    for batch, _ in agreed_batches(loader, data, ctx):
        loss, _ = state.model(batch)
        total += torch.tensor([float(loss) * batch.size, batch.size], dtype=torch.float64)
    state.model.train()
    if ctx.world_size > 1:
        all_reduce_sum_(total)
    return float(total[0] / total[1].clamp(min=1))
