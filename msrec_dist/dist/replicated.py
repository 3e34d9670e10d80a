"""Replicated (data_parallel) embedding tables: their optimizer, in the fused kernel's state layout.

    small table (sharding.replicate_max_mb, world > 1) ──planner: data_parallel──►
      a full copy on every rank; torchrec wraps its lookup in DDP (taken off again with
      train.grad_sync 'flat', which averages these gradients with the dense ones: dist/grad_sync.py)
    backward: the table's dense gradient [rows, D], averaged over ranks (one all-reduce,
      instead of the model-parallel path's KJT and pooled all-to-alls)
    DenseStep.step ──ReplicatedTableOptimizer.step──► the update the fused kernel would make

Why by hand: torchrec gives data_parallel tables no optimizer (its in-backward fused optimizer
exists only for the fused kernels), and torchrec.optim.RowWiseAdagrad keeps its state as
{"sum": [rows, 1], "step"} where the fused kernel keeps {"<table>.momentum1": [rows]}. Keeping
the fused layout lets a checkpoint move between a replicated and a model-parallel layout of the
same table (saved on 2 ranks, resumed on 1) through DCP with no conversion.

The math is fbgemm's EXACT_ROWWISE_ADAGRAD (and plain SGD) on a dense gradient: a row absent from
the batch has a zero gradient, so its state and weights stay as the fused kernel leaves them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.optim.keyed import KeyedOptimizer

# The sparse optimizers with a replicated form (config name → what the state holds).
REPLICATED_OPTIMIZERS = ("rowwise_adagrad", "sgd")
FUSED_ROWWISE_ADAGRAD_EPS = 1e-8  # fbgemm's default, what the fused tables use


def rowwise_adagrad_(weight: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, lr: float,
                     eps: float) -> None:
    """In place: momentum [rows] += mean over D of grad²; weight [rows, D] -= lr * grad / (sqrt(momentum) + eps)."""
    momentum.add_(grad.square().mean(dim=1))
    weight.addcdiv_(grad, momentum.sqrt().add_(eps).unsqueeze(1), value=-lr)


class ReplicatedTableOptimizer(KeyedOptimizer):
    """The sparse optimizer of the replicated tables, stepped after backward (with the dense one).

    params: {"model.embedding.ebc.embedding_bags.<table>.weight": weight [rows, D]}, the keys the
    fused optimizer uses for the same tables; tables: the table name of each key.
    """

    def __init__(self, params: dict[str, nn.Parameter], tables: dict[str, str], kind: str, lr: float,
                 eps: float = FUSED_ROWWISE_ADAGRAD_EPS) -> None:
        if kind not in REPLICATED_OPTIMIZERS:
            raise ValueError(f"replicated tables support sparse_optimizer {REPLICATED_OPTIMIZERS}, got {kind!r}")
        self.kind = kind
        state: dict[Any, Any] = {}
        if kind == "rowwise_adagrad":
            state = {p: {f"{tables[key]}.momentum1": torch.zeros(p.size(0), dtype=torch.float32, device=p.device)}
                     for key, p in params.items()}
        groups = [{"params": list(params.values()), "lr": lr, "eps": eps}]
        super().__init__(params, state, groups)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params.values():
            p.grad = None  # DDP (gradient_as_bucket_view) writes a fresh bucket view next backward;
            # with grad_sync "flat" DenseStep zeroes the shared gradient buffer instead of calling this

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        group = next(iter(self.param_groups))
        for p in self.params.values():
            if p.grad is None:
                continue
            if self.kind == "sgd":
                p.add_(p.grad, alpha=-group["lr"])
            else:
                (momentum,) = self.state[p].values()
                rowwise_adagrad_(p, p.grad, momentum, group["lr"], group["eps"])
