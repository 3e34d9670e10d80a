"""The planner, given a simulated 2×8 CUDA topology and the demo tables scaled up, spreads the
big tables across ranks within each rank's memory budget — no GPU needed."""
import dataclasses

import pytest
import torch

from msrec_dist.config import ShardingConfig, TableConstraint
from msrec_dist.distributed.sharding import build_constraints, build_topology, plan_sharding, plan_to_json
from msrec_dist.features import FeatureSpec, ScenarioSpec, SparseFeature, TaskSpec
from msrec_dist.model.config import ModelConfig
from msrec_dist.model.zoo import MultiScenarioModel, MultiTaskTrainModule
from msrec_dist.typed_yaml import ConfigError

HBM_GB = 16.0


def scaled_data() -> FeatureSpec:
    dim = 64
    return FeatureSpec(
        scenario=ScenarioSpec(column="scenario", names=["home", "search", "cart"]),
        tasks=[TaskSpec("click", "click"), TaskSpec("convert", "convert")],
        sparse=[
            SparseFeature("user_id", "user", 100_000_000, dim),
            SparseFeature("item_id", "item", 10_000_000, dim),
            SparseFeature("hist_item_ids", "item", 10_000_000, dim, pooling="mean"),
            SparseFeature("item_category", "category", 1000, dim),
        ],
        dense=[],
    )


def meta_model() -> MultiTaskTrainModule:
    data = scaled_data()
    return MultiTaskTrainModule(MultiScenarioModel(ModelConfig(), data, embedding_device=torch.device("meta")), [])


def test_cuda_2x8_plan_spreads_big_tables_within_budget():
    topology = build_topology(16, 8, "cuda", ShardingConfig(hbm_gb=HBM_GB))
    plan = plan_to_json(plan_sharding(meta_model(), topology, ShardingConfig()))
    tables = plan["model.embedding.ebc"]
    user, item = tables["user"], tables["item"]
    # 100M x 64 fp32 = 25.6 GB > one rank's 16 GB: it must be split, over several ranks
    assert user["sharding_type"] in {"row_wise", "table_row_wise", "column_wise"}
    assert len({s["placement"] for s in user["shards"]}) > 1
    # every rank's embedding bytes stay under its budget
    per_rank: dict[str, int] = {}
    for t in tables.values():
        for s in t["shards"]:
            per_rank[s["placement"]] = per_rank.get(s["placement"], 0) + s["sizes"][0] * s["sizes"][1] * 4
    assert max(per_rank.values()) < HBM_GB * 1024**3
    assert len(per_rank) > 2, per_rank
    # the shards tile the table exactly
    assert sum(s["sizes"][0] * s["sizes"][1] for s in user["shards"]) == 100_000_000 * 64
    assert item["shards"], item


def test_cpu_plan_uses_table_wise_or_data_parallel():
    topology = build_topology(2, 2, "cpu", ShardingConfig())
    plan = plan_to_json(plan_sharding(meta_model(), topology, ShardingConfig()))
    for t in plan["model.embedding.ebc"].values():
        assert t["sharding_type"] in {"table_wise", "data_parallel"}


def test_yaml_constraint_is_obeyed():
    cfg = ShardingConfig(hbm_gb=HBM_GB, constraints={"item": TableConstraint(sharding_types=["column_wise"])})
    plan = plan_to_json(plan_sharding(meta_model(), build_topology(16, 8, "cuda", cfg), cfg))
    assert plan["model.embedding.ebc"]["item"]["sharding_type"] == "column_wise"


TABLES = {"user": 8 << 20, "item": 512 << 10, "category": 4 << 10}  # bytes


def _types(constraints) -> dict[str, list[str]]:
    return {t: c.sharding_types for t, c in constraints.items()}


def test_small_tables_are_replicated_on_more_than_one_rank_or_a_cpu():
    cfg = ShardingConfig()  # replicate_max_mb = 1
    replicated = {"user": ["table_wise"], "item": ["data_parallel"], "category": ["data_parallel"]}
    assert _types(build_constraints(cfg, TABLES, "cpu", world_size=2)) == replicated
    # a CPU world of one too (the dense kernel + one-pass Adagrad beat fbgemm's fused CPU backward)
    assert _types(build_constraints(cfg, TABLES, "cpu", world_size=1)) == replicated
    # a CUDA world of one keeps the fused kernel: nothing to replicate across
    cuda_one = _types(build_constraints(cfg, TABLES, "cuda", world_size=1))
    assert "data_parallel" not in {t for types in cuda_one.values() for t in types}
    # 0 turns the rule off; so does a sparse optimizer with no replicated form
    assert all(t == ["table_wise"] for t in _types(build_constraints(ShardingConfig(replicate_max_mb=0), TABLES,
                                                                     "cpu", world_size=2)).values())
    assert all(t == ["table_wise"] for t in _types(build_constraints(cfg, TABLES, "cpu", world_size=2,
                                                                     replicate=False)).values())


def test_constraints_override_the_size_rule():
    cfg = ShardingConfig(constraints={"item": TableConstraint(sharding_types=["table_wise"]),
                                      "user": TableConstraint(sharding_types=["data_parallel"])})
    types = _types(build_constraints(cfg, TABLES, "cpu", world_size=2))
    assert types["item"] == ["table_wise"] and types["user"] == ["data_parallel"]
    with pytest.raises(ConfigError, match=r"user.*data_parallel.*rowwise_adagrad or sgd"):
        build_constraints(cfg, TABLES, "cpu", world_size=2, replicate=False)


def test_cpu_plan_on_two_ranks_replicates_small_tables():
    data = dataclasses.replace(scaled_data(), sparse=[dataclasses.replace(f, num_embeddings=1000, dim=16)
                                                      for f in scaled_data().sparse])
    model = MultiTaskTrainModule(MultiScenarioModel(ModelConfig(), data, embedding_device=torch.device("meta")), [])
    plan = plan_to_json(plan_sharding(model, build_topology(2, 2, "cpu", ShardingConfig()), ShardingConfig()))
    assert {t["sharding_type"] for t in plan["model.embedding.ebc"].values()} == {"data_parallel"}
