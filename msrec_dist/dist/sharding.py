"""Sharding plan: torchrec's planner over a Topology built from the run's world.

    ShardingConfig (per-table sharding types / compute kernels, memory budget)
      + Topology(world_size, local_world_size, compute_device)
      ──EmbeddingShardingPlanner.collective_plan──► ShardingPlan (same on every rank)
      ──DistributedModelParallel──► sharded EmbeddingBagCollection + DDP-wrapped dense part

On CPU (gloo) the planner offers table_wise; on CUDA it chooses among table_wise, row_wise,
table_row_wise, column_wise for large tables. data_parallel is excluded (see MODEL_PARALLEL_TYPES). `plan_to_json` writes the
chosen plan so a run directory records where every table lives.
"""
from __future__ import annotations

import json
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan
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


# Model-parallel sharding types: a row's gradient is the sum over ranks, which the model
# rescales by 1/world_size (embedding.scale_grad). data_parallel tables would instead be
# averaged by DDP, so they are left out: every table is model-parallel.
MODEL_PARALLEL_TYPES = ["table_wise", "row_wise", "table_row_wise", "column_wise", "table_column_wise"]
# On CPU (gloo, the fbgemm CPU kernels) table_wise is the supported, tested layout.
DEFAULT_TYPES = {"cuda": MODEL_PARALLEL_TYPES, "cpu": ["table_wise"]}


def build_constraints(cfg: ShardingConfig, table_names: list[str], compute_device: str
                      ) -> dict[str, ParameterConstraints]:
    unknown = sorted(set(cfg.constraints) - set(table_names))
    if unknown:
        raise ConfigError(f"sharding.constraints: unknown table(s) {unknown}; tables: {table_names}")
    out = {}
    for table in table_names:
        c = cfg.constraints.get(table)
        types = (c.sharding_types if c and c.sharding_types else DEFAULT_TYPES[compute_device])
        bad = sorted(set(types) - set(MODEL_PARALLEL_TYPES))
        if bad:
            raise ConfigError(f"sharding.constraints.{table}.sharding_types: {bad} not allowed; "
                              f"choose from {MODEL_PARALLEL_TYPES}")
        out[table] = ParameterConstraints(sharding_types=list(types),
                                          compute_kernels=(c.compute_kernels or None) if c else None)
    return out


def table_names(model: nn.Module) -> list[str]:
    return [cfg.name for m in model.modules() if isinstance(m, EmbeddingBagCollection)
            for cfg in m.embedding_bag_configs()]


def plan_sharding(model: nn.Module, topology: Topology, cfg: ShardingConfig,
                  group: Optional[dist.ProcessGroup] = None) -> ShardingPlan:
    """The plan every rank agrees on (collective_plan) or, without a process group, a local plan."""
    constraints = build_constraints(cfg, table_names(model), topology.compute_device)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    if group is not None:
        return planner.collective_plan(model, get_default_sharders(), group)
    return planner.plan(model, get_default_sharders())


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
