"""Replicated (data_parallel) embedding tables: their optimizer, in the fused kernel's state layout.

    small table (sharding.replicate_max_mb; world > 1, or a CPU world of one) ──planner: data_parallel──►
      a full copy on every rank; torchrec wraps its lookup in DDP (taken off again with
      train.grad_sync 'flat', which averages these gradients after the dense ones: distributed/grad_sync.py)
    backward: the table's dense gradient [rows, D], averaged over ranks (one all-reduce,
      instead of the model-parallel path's KJT and pooled all-to-alls); zero_grad drops it
    DenseStep.step ──ReplicatedTableOptimizer.step──► the update the fused kernel would make
        (row-wise Adagrad on CPU: csrc/rowwise_adagrad.cpp, one pass that updates only the rows
        with a nonzero gradient and zeroes them; else the torch ops below, on every row)

Why by hand: torchrec gives data_parallel tables no optimizer (its in-backward fused optimizer
exists only for the fused kernels), and torchrec.optim.RowWiseAdagrad keeps its state as
{"sum": [rows, 1], "step"} where the fused kernel keeps {"<table>.momentum1": [rows]}. Keeping
the fused layout lets a checkpoint move between a replicated and a model-parallel layout of the
same table (saved on 2 ranks, resumed on 1) through DCP with no conversion.

The math is fbgemm's EXACT_ROWWISE_ADAGRAD (and plain SGD) on a dense gradient: a row absent from
the batch has a zero gradient, so its state and weights stay as the fused kernel leaves them.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torchrec.optim.keyed import KeyedOptimizer

from msrec_dist.kernels.native import HAVE_CSRC  # loads msrec_dist._C: torch.ops.msrec.rowwise_adagrad_dense_

# fbgemm's dense table kernel (the replicated tables' lookup) registers its op for the CPU / CUDA
# keys and records its own autograd Function inside them, so torch's fallback warns at every
# backward that the op has no Autograd kernel and "may" give wrong gradients. They are right:
# tests/distributed/test_replicated.py and test_local_lookup.py compare the updates with fbgemm's fused
# kernel and with DMP's path. Only this message is silenced.
warnings.filterwarnings("ignore", message=r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel "
                        r"was not registered", category=UserWarning)

# The sparse optimizers with a replicated form (config name → what the state holds).
REPLICATED_OPTIMIZERS = ("rowwise_adagrad", "sgd")
FUSED_ROWWISE_ADAGRAD_EPS = 1e-8  # fbgemm's default, what the fused tables use


def rowwise_adagrad_(weight: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, lr: float,
                     eps: float) -> None:
    """In place: momentum [rows] += mean over D of grad²; weight [rows, D] -= lr * grad / (sqrt(momentum) + eps)."""
    momentum.add_(grad.square().mean(dim=1))
    weight.addcdiv_(grad, momentum.sqrt().add_(eps).unsqueeze(1), value=-lr)


def one_pass_rowwise_adagrad(weight: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor) -> bool:
    """Whether csrc/rowwise_adagrad.cpp's op can take this table: built, CPU, contiguous, one
    dtype. It makes rowwise_adagrad_'s update on the rows with a nonzero gradient only (the same
    values: a zero row's update changes nothing) and zeroes those gradient rows, in one pass."""
    return (HAVE_CSRC and weight.device.type == "cpu" and weight.dim() == 2
            and weight.dtype == grad.dtype == momentum.dtype
            and weight.is_contiguous() and grad.is_contiguous() and momentum.is_contiguous())


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
            p.grad = None  # the next backward's gradient (fbgemm's fresh tensor, or DDP's bucket
            # view with gradient_as_bucket_view) is then taken as is, with no add into an old one

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        group = next(iter(self.param_groups))
        for p in self.params.values():
            # read once: a table's .grad is a property (torchrec's TableBatchedEmbeddingSlice)
            # that slices and views the kernel's flat gradient on every access
            grad = p.grad
            if grad is None:
                continue
            if self.kind == "sgd":
                p.add_(grad, alpha=-group["lr"])
                continue
            (momentum,) = self.state[p].values()
            if one_pass_rowwise_adagrad(p, grad, momentum):
                torch.ops.msrec.rowwise_adagrad_dense_(p, grad, momentum, group["lr"], group["eps"])
            else:
                rowwise_adagrad_(p, grad, momentum, group["lr"], group["eps"])
