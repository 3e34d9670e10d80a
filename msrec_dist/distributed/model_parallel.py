"""Model → DistributedModelParallel with a fused sparse optimizer and a dense optimizer.

    MultiTaskTrainModule (EBC on the meta device, dense layers on CPU, seeded; world > 1: the
        partitioned norm built with collectives.all_reduce_sum as its sum over ranks)
      ──apply_optimizer_in_backward(sparse optimizer, EBC params)──►
      ──plan_sharding──► ShardingPlan ──DistributedModelParallel──► DMP
      ──init_embeddings (deterministic per row block, independent of the sharding)──►
      ──pretrained tables (data.yaml `init`): their rows from the vectors file, read before the
        planner; frozen ones: no in-backward optimizer, kernels without gradient, left out of
        every optimizer (distributed/pretrained.py)──►
    world of one, or every table replicated with grad_sync 'flat': the embedding pools through
        the sharded EBC's kernel (FieldEmbedding.use_pooled_lookup(KernelLookup),
        distributed/local_lookup.py); a CPU world of one replicates its small tables
        (distributed/sharding.py), torchrec's DDP taken off their lookups
    replicated (data_parallel) tables: unscaled field gradients + ReplicatedTableOptimizer
        (distributed/replicated.py), stepped after backward with the dense optimizer
    world > 1: dense and replicated gradients averaged by DDP or by one flat all-reduce
        (train.grad_sync, distributed/grad_sync.py); on one host with gloo, the loop's sums go through
        shared memory (train.host_reduce, distributed/collectives.py)
    dense optimizer (Adam by default) over every other parameter, + LR schedule

Embedding rows are initialised from a generator seeded by (seed, table, row block), so the
same seed gives the same weights on 1 rank, on 2 ranks table_wise, or on 16 ranks row_wise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DataParallelWrapper, DefaultDataParallelWrapper
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from msrec_dist.config import ExperimentConfig, TrainConfig
from msrec_dist.distributed.collectives import all_reduce_sum, enable_host_reduce
from msrec_dist.distributed.context import DistContext
from msrec_dist.distributed.dense_optim import FusedAdam
from msrec_dist.distributed.grad_sync import FlatAllReduce, broadcast_from_rank0, resolve_grad_sync, unwrap_replicated_lookups
from msrec_dist.distributed.local_lookup import find_kernel_lookup
from msrec_dist.distributed.pretrained import freeze_kernels, load_vectors, read_table_vectors, without_frozen
from msrec_dist.distributed.replicated import REPLICATED_OPTIMIZERS, ReplicatedTableOptimizer
from msrec_dist.distributed.sharding import (build_topology, device_type, model_parallel_grad_scale, plan_sharding,
                                     replicated_tables)
from msrec_dist.features import FeatureSpec
from msrec_dist.model.sass import SASSPretrainModule
from msrec_dist.model.zoo import MultiTaskTrainModule, build_model

SPARSE_OPTIMIZERS = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}
DENSE_OPTIMIZERS = {"adam": FusedAdam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
INIT_BLOCK_ROWS = 65536


class DenseDataParallel(DataParallelWrapper):
    """torchrec's default DDP wrapping of the dense modules with grad_sync 'ddp' in a world of more
    than one; otherwise the module stays as is. In a world of one DDP only adds an all-reduce of
    every gradient with itself and per-step hooks (~0.2 ms a ple step at B = 1024); with grad_sync
    'flat' FlatAllReduce averages the gradients (distributed/grad_sync.py). State dict keys are the
    same either way (DMP strips DDP's prefix)."""

    def __init__(self, ddp: bool) -> None:
        self.ddp = ddp

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        if env.world_size > 1 and self.ddp:
            DefaultDataParallelWrapper().wrap(dmp, env, device)


@dataclass
class TrainState:
    """What the loop drives: the sharded model and both optimizers."""
    model: DistributedModelParallel
    optimizer: CombinedOptimizer  # sparse (fused, in backward) + dense
    dense_optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    dense_params: list[nn.Parameter]
    plan: ShardingPlan
    local_lookup: bool = False  # the embedding calls the sharded EBC's kernel directly (world of one, all replicated)
    replicated_optimizer: Optional[ReplicatedTableOptimizer] = None  # the data_parallel tables' (if any)
    grad_sync: Optional[FlatAllReduce] = None  # grad_sync 'flat' in a world > 1; None: DDP or a world of one
    host_reduce: bool = False  # the loop's sums over ranks go through shared memory (train.host_reduce)
    frozen_tables: frozenset[str] = frozenset()  # loaded from vectors, never trained (data.yaml init.freeze)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warm-up, then none / cosine / linear decay to 10% over `total_steps`."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_decay == "none" or total_steps <= cfg.warmup_steps:
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / (total_steps - cfg.warmup_steps))
        if cfg.lr_decay == "cosine":
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - 0.9 * progress
    return factor


def build_train_module(cfg: ExperimentConfig, data: FeatureSpec, world_size: int) -> nn.Module:
    """The unsharded train module (the tasks' loss, or with train.stage=pretrain SASS's contrastive
    loss); dense weights from `cfg.run.seed`, EBC on the meta device. In a world of several ranks
    the partitioned norm sums its statistics over them (all_reduce_sum: shared memory or gloo, as
    the loop's sums; its backward sums the gradients)."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, data, rank_sum=all_reduce_sum if world_size > 1 else None,
                        embedding_device=torch.device("meta"))
    if cfg.train.stage == "pretrain":
        return SASSPretrainModule(model, cfg.model.sass)
    return MultiTaskTrainModule(model, cfg.train.task_weights)


def init_block(seed: int, table_index: int, block: int, rows: int, dim: int, bound: float) -> torch.Tensor:
    """Rows of one init block, a pure function of (seed, table, block)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + table_index * 7919 + block)
    return torch.empty(rows, dim).uniform_(-bound, bound, generator=gen)


def fill_table_shard(out: torch.Tensor, row0: int, col0: int, num_rows: int, dim: int,
                     seed: int, table_index: int) -> None:
    """Write rows [row0, row0+out.rows) × cols [col0, ...) of the table's deterministic init."""
    bound = math.sqrt(1.0 / num_rows)
    r, end = row0, row0 + out.size(0)
    while r < end:
        block = r // INIT_BLOCK_ROWS
        b0 = block * INIT_BLOCK_ROWS
        values = init_block(seed, table_index, block, min(INIT_BLOCK_ROWS, num_rows - b0), dim, bound)
        take = min(end, b0 + values.size(0)) - r
        out[r - row0: r - row0 + take].copy_(values[r - b0: r - b0 + take, col0: col0 + out.size(1)])
        r += take


def table_name(key: str) -> str:
    """The table of an EBC weight's state_dict / parameter key ("...embedding_bags.<table>.weight"), else ""."""
    return key.split(".embedding_bags.")[1].rsplit(".", 1)[0] if ".embedding_bags." in key else ""


@torch.no_grad()
def init_embeddings(dmp: DistributedModelParallel, data: FeatureSpec, seed: int) -> None:
    """Deterministic init of every local shard of every embedding table."""
    tables = {t.name: (i, t) for i, t in enumerate(data.tables())}
    for key, value in dmp.state_dict().items():
        if not (name := table_name(key)):
            continue
        index, table = tables[name]
        if hasattr(value, "local_shards"):  # ShardedTensor
            for shard in value.local_shards():
                offsets = shard.metadata.shard_offsets
                fill_table_shard(shard.tensor, offsets[0], offsets[1], table.num_embeddings, table.dim, seed, index)
        else:  # a replicated (data_parallel) table
            fill_table_shard(value, 0, 0, table.num_embeddings, table.dim, seed, index)


def build_train_state(cfg: ExperimentConfig, data: FeatureSpec, ctx: DistContext, total_steps: int) -> TrainState:
    vectors = read_table_vectors(data)  # every rank reads its copy; a bad file fails before the planner
    frozen = data.frozen_tables()
    module = build_train_module(cfg, data, ctx.world_size)
    t = cfg.train
    sparse_kwargs = {"lr": t.sparse_lr}
    # Frozen tables get no in-backward optimizer: the sharder then puts them in batched kernels of
    # their own (its grouping key holds the optimizer), which freeze_kernels takes the gradient off.
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[t.sparse_optimizer],
                                [p for key, p in module.model.embedding.ebc.named_parameters()
                                 if table_name("." + key) not in frozen], sparse_kwargs)
    topology = build_topology(ctx.world_size, ctx.local_world_size, device_type(ctx.device), cfg.sharding)
    plan = plan_sharding(module, topology, cfg.sharding, dist.group.WORLD,
                         replicate=t.sparse_optimizer in REPLICATED_OPTIMIZERS)
    sync = resolve_grad_sync(t.grad_sync, device_type(ctx.device)) if ctx.world_size > 1 else "none"
    dmp = DistributedModelParallel(module, device=ctx.device, plan=plan,
                                   data_parallel_wrapper=DenseDataParallel(ddp=sync == "ddp"))
    init_embeddings(dmp, data, cfg.run.seed)
    load_vectors(dmp.state_dict(), data.tables(), vectors)
    del vectors
    freeze_kernels(dmp, frozen)  # before the lookups are unwrapped: only trained weights are summed
    host_reduce = ctx.world_size > 1 and enable_host_reduce(t.host_reduce, dist.group.WORLD, t.collective_timeout_s)
    # torchrec's DDP comes off the replicated lookups where FlatAllReduce sums their gradients, and
    # in a world of one, where there is nothing to sum and it only costs
    unwrapped = unwrap_replicated_lookups(dmp) if sync == "flat" or ctx.world_size == 1 else []
    grad_sync = FlatAllReduce(unwrapped, dist.group.WORLD, ctx.world_size) if sync == "flat" else None
    embedding = dmp.module.model.embedding
    replicated = replicated_tables(plan)
    # every table on every rank: the kernel alone is the lookup (with DDP its hooks must run, and
    # a train pipeline must find the sharded EBC)
    all_replicated = (ctx.world_size == 1 or grad_sync is not None) and replicated == {t.name for t in data.tables()}
    if (ctx.world_size == 1 or all_replicated) and cfg.train.pipeline != "sparse_dist":
        embedding.use_pooled_lookup(find_kernel_lookup(embedding.ebc, data.kjt_keys, replicated=all_replicated))
    embedding.set_grad_scales(model_parallel_grad_scale(ctx.world_size), replicated)
    # frozen replicated tables' weights (no requires_grad, no optimizer) are no dense parameters either
    named_dense = {key: p for key, p in in_backward_optimizer_filter(dmp.named_parameters())
                   if table_name(key) not in frozen}
    # the embedding tables left here are the replicated ones (the fused ones optimize in backward)
    table_of = {key: table_name(key) for key in sorted(named_dense) if table_name(key)}
    replicated_optimizer = (ReplicatedTableOptimizer({k: named_dense.pop(k) for k in table_of}, table_of,
                                                     t.sparse_optimizer, t.sparse_lr) if table_of else None)
    dense_cls = DENSE_OPTIMIZERS[t.dense_optimizer]
    # fused=True: one kernel over all dense parameters (CPU and CUDA) instead of a loop of small
    # ops per tensor (FusedAdam, distributed/dense_optim.py: the same kernel without torch's
    # per-step Python; the ple model's Adam step 1.2 ms → 0.15 ms).
    dense = KeyedOptimizerWrapper(named_dense, lambda params: dense_cls(params, lr=t.dense_lr,
                                                                         weight_decay=t.weight_decay, fused=True))
    # The replicated tables' optimizer shares the fused one's "sparse" prefix and state layout, so
    # checkpoints name a table's optimizer state the same in either layout.
    fused = without_frozen(dmp.fused_optimizer, frozen)  # the frozen kernels' optimizers never step
    sparse = ([("sparse", fused)] if fused is not None else []) + (
        [("sparse", replicated_optimizer)] if replicated_optimizer else [])
    optimizer = CombinedOptimizer(sparse + [("dense", dense)])
    scheduler = torch.optim.lr_scheduler.LambdaLR(dense._optimizer, lr_lambda(t, total_steps))
    if grad_sync is not None:  # every rank starts from rank 0's weights, as DDP would make it
        broadcast_from_rank0(list(named_dense.values()) + list(grad_sync.replicated_params), grad_sync.group)
    return TrainState(dmp, optimizer, dense, scheduler, list(named_dense.values()), plan,
                      local_lookup=embedding.pooled_lookup is not None, replicated_optimizer=replicated_optimizer,
                      grad_sync=grad_sync, host_reduce=host_reduce, frozen_tables=frozenset(frozen))
