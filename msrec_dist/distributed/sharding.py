"""Sharding plan: torchrec's planner over a Topology built from the run's world.

    ShardingConfig (per-table sharding types / compute kernels, replicate_max_mb, memory budget)
      + Topology(world_size, local_world_size, compute_device)
      ──build_constraints: small tables → data_parallel (world > 1, or CPU), the rest model-parallel──►
      ──EmbeddingShardingPlanner.collective_plan──► ShardingPlan (same on every rank)
      ──DistributedModelParallel──► sharded EmbeddingBagCollection + data-parallel dense part
      (DDP or one flat all-reduce, train.grad_sync: distributed/grad_sync.py)

Model-parallel tables: table_wise on CPU (gloo); on CUDA the planner chooses among table_wise,
row_wise, table_row_wise, column_wise. Replicated tables (data_parallel): in a world of more than
one, every table of at most `replicate_max_mb` (fp32 weights) unless a constraint names its
types; msrec_dist/distributed/replicated.py holds their optimizer. `plan_to_json` writes the chosen plan
so a run directory records where every table lives.

Why a size rule instead of the planner's choice: offered both types, torchrec's planner (its cost
model prices bytes, not the per-collective latency that dominates gloo) replicated only the two
smallest demo tables and kept the others table_wise, which keeps all five KJT / pooled-embedding
all-to-alls and adds an all-reduce. All tables replicated, a 2-rank step issues 3 collectives
instead of 7 (the 2-rank ple step at global batch 512 on CPU: 16.3 → 13.3 ms).
"""
from __future__ import annotations

import json
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.model_parallel import get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from msrec_dist.config import ShardingConfig
from msrec_dist.typed_yaml import ConfigError


def build_topology(world_size: int, local_world_size: int, compute_device: str,
                   cfg: ShardingConfig) -> Topology:
    kwargs = {}
    if cfg.hbm_gb > 0:
        kwargs["hbm_cap"] = int(cfg.hbm_gb * 1024**3)
    if cfg.ddr_gb > 0:
        kwargs["ddr_cap"] = int(cfg.ddr_gb * 1024**3)
    return Topology(world_size=world_size, local_world_size=local_world_size,
                    compute_device=compute_device, **kwargs)


# Model-parallel sharding types: a row's gradient is the sum over ranks, divided by the world
# size in torchrec's backward all-to-all (see model_parallel_grad_scale). Replicated
# (data_parallel) tables are averaged over ranks with the dense gradients instead (distributed/grad_sync.py).
MODEL_PARALLEL_TYPES = ["table_wise", "row_wise", "table_row_wise", "column_wise", "table_column_wise"]
REPLICATED = "data_parallel"
ALLOWED_TYPES = MODEL_PARALLEL_TYPES + [REPLICATED]
# On CPU (gloo, the fbgemm CPU kernels) table_wise is the supported, tested model-parallel layout.
DEFAULT_TYPES = {"cuda": MODEL_PARALLEL_TYPES, "cpu": ["table_wise"]}


def table_bytes(model: nn.Module) -> dict[str, int]:
    """{table: bytes of its weights}, in the EBCs' table order."""
    return {cfg.name: cfg.num_embeddings * cfg.embedding_dim * data_type_to_dtype(cfg.data_type).itemsize
            for m in model.modules() if isinstance(m, EmbeddingBagCollection) for cfg in m.embedding_bag_configs()}


def default_types(size_bytes: int, cfg: ShardingConfig, compute_device: str, world_size: int,
                  replicate: bool) -> list[str]:
    """A table's sharding types when no constraint names them: replicated when small (and more
    than one rank or a CPU, and the sparse optimizer has a replicated form), else the device's
    model-parallel types.

    A world of one on CPU replicates too: fbgemm's CPU kernel with row-wise Adagrad fused into its
    backward (sort the batch's ids, accumulate, update) cost more than the dense-gradient kernel
    plus csrc/rowwise_adagrad.cpp's one pass over the table gradient (the ple train step 2-4%
    faster on CPU). On CUDA the fused kernel stays.
    """
    if replicate and (world_size > 1 or compute_device == "cpu") and size_bytes <= cfg.replicate_max_mb * 2**20:
        return [REPLICATED]
    return DEFAULT_TYPES[compute_device]


def build_constraints(cfg: ShardingConfig, tables: dict[str, int], compute_device: str, world_size: int = 1,
                      replicate: bool = True) -> dict[str, ParameterConstraints]:
    """Planner constraints per table ({name: bytes}); `replicate` False (a sparse optimizer with no
    replicated form) turns the size rule off and refuses data_parallel constraints."""
    unknown = sorted(set(cfg.constraints) - set(tables))
    if unknown:
        raise ConfigError(f"sharding.constraints: unknown table(s) {unknown}; tables: {list(tables)}")
    allowed = ALLOWED_TYPES if replicate else MODEL_PARALLEL_TYPES
    out = {}
    for table, size in tables.items():
        c = cfg.constraints.get(table)
        types = (c.sharding_types if c and c.sharding_types
                 else default_types(size, cfg, compute_device, world_size, replicate))
        bad = sorted(set(types) - set(allowed))
        if bad:
            why = "" if replicate else " (data_parallel needs sparse_optimizer rowwise_adagrad or sgd)"
            raise ConfigError(f"sharding.constraints.{table}.sharding_types: {bad} not allowed{why}; "
                              f"choose from {allowed}")
        out[table] = ParameterConstraints(sharding_types=list(types),
                                          compute_kernels=(c.compute_kernels or None) if c else None)
    return out


def plan_sharding(model: nn.Module, topology: Topology, cfg: ShardingConfig,
                  group: Optional[dist.ProcessGroup] = None, replicate: bool = True) -> ShardingPlan:
    """The plan every rank agrees on (collective_plan) or, without a process group, a local plan."""
    constraints = build_constraints(cfg, table_bytes(model), topology.compute_device, topology.world_size, replicate)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    if group is not None:
        return planner.collective_plan(model, get_default_sharders(), group)
    return planner.plan(model, get_default_sharders())


def model_parallel_grad_scale(world_size: int) -> float:
    """The gradient scale of fields from model-parallel tables, so that every gradient is the
    global-batch mean (DDP or grad_sync 'flat' averages the dense and the replicated tables'
    gradients over ranks).

    A model-parallel table's rows get the sum over ranks of their pooled-embedding gradients,
    which torchrec's backward all-to-all already divides by the world size (comm_ops gradient
    division, on by default): no scale then. Only with that division turned off do they need
    1/world_size. (Until this was found, the fields were scaled by 1/world_size on top of
    torchrec's division: model-parallel embedding updates were 1/world of the 1-rank ones.)
    """
    return 1.0 if world_size == 1 or get_gradient_division() else 1.0 / world_size


def replicated_tables(plan: ShardingPlan) -> set[str]:
    """Names of the tables the plan replicates (data_parallel)."""
    return {name for tables in plan_to_json(plan).values() for name, p in tables.items()
            if p["sharding_type"] == REPLICATED}


def plan_to_json(plan: ShardingPlan) -> dict:
    """{module path: {table: {sharding_type, compute_kernel, ranks, shard sizes}}}."""
    out = {}
    for module_path, params in plan.plan.items():
        tables = {}
        for name, p in params.items():
            shards = getattr(p.sharding_spec, "shards", None) or []
            tables[name] = {
                "sharding_type": p.sharding_type,
                "compute_kernel": p.compute_kernel,
                "ranks": list(p.ranks or []),
                "shards": [{"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes),
                            "placement": str(s.placement)} for s in shards],
            }
        out[module_path] = tables
    return out


def describe_plan(plan: ShardingPlan) -> str:
    lines = []
    for module_path, tables in plan_to_json(plan).items():
        for name, p in tables.items():
            lines.append(f"  {module_path}.{name}: {p['sharding_type']} / {p['compute_kernel']} on ranks {p['ranks']}")
    return "sharding plan:\n" + "\n".join(lines)


def save_plan(plan: ShardingPlan, path: str) -> None:
    with open(path, "w") as f:
        json.dump(plan_to_json(plan), f, indent=2)


def device_type(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"
