"""Shared tiny fixtures for the model-block tests: a hand-made FeatureSpec and a 4-row Batch.

FeatureSpec (`model_data`): S = 3 scenarios, T = 2 tasks, D = 4.
    sparse (schema order)              table   pooling
      item_id                          item    sum
      user_id                          user    sum
      hist_item_ids  (a list feature)  item    mean   ← shares table `item` with item_id
    dense: price, age                  (N_d = 2)
KJT key order (FeatureSpec.kjt_keys, features grouped by table): [item_id, hist_item_ids, user_id],
which is also the sparse field order.

Batch (`batch4`), B = 4; the KJT as a grid of bags (feature f, sample b):

                    b=0      b=1     b=2        b=3
    item_id         [3]      [7]     [1]        [9]
    hist_item_ids   [2, 5]   []      [4, 6, 8]  [5]     ← b=1 is an empty bag
    user_id         [10]     [11]    [12]       [13]

    values  = [3, 7, 1, 9,  2, 5, 4, 6, 8, 5,  10, 11, 12, 13]
    lengths = [1, 1, 1, 1,  2, 0, 3, 1,  1, 1, 1, 1]          (feature-major, F_s * B)
    scenario = [0, 1, 2, 0]
"""
from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msrec_dist.batch import Batch
from msrec_dist.features import DenseFeature, FeatureSpec, ScenarioSpec, SparseFeature, TaskSpec

S, T, D, B = 3, 2, 4, 4
SPARSE_KEYS = ["item_id", "hist_item_ids", "user_id"]  # KJT key order (kjt_keys)
BAGS = {  # feature → one list of ids per sample
    "item_id": [[3], [7], [1], [9]],
    "user_id": [[10], [11], [12], [13]],
    "hist_item_ids": [[2, 5], [], [4, 6, 8], [5]],
}
SCENARIO = [0, 1, 2, 0]


def make_data_config() -> FeatureSpec:
    cfg = FeatureSpec(
        scenario=ScenarioSpec(column="scenario", names=["home", "search", "cart"]),
        tasks=[TaskSpec("click", "click"), TaskSpec("convert", "convert")],
        sparse=[
            SparseFeature("item_id", table="item", num_embeddings=20, dim=D),
            SparseFeature("user_id", table="user", num_embeddings=16, dim=D),
            SparseFeature("hist_item_ids", table="item", num_embeddings=20, dim=D, pooling="mean"),
        ],
        dense=[DenseFeature("price"), DenseFeature("age")],
    )
    cfg.validate("model_data")
    return cfg


def make_kjt(bags: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    values = [i for key in SPARSE_KEYS for bag in bags[key] for i in bag]
    lengths = [len(bag) for key in SPARSE_KEYS for bag in bags[key]]
    return KeyedJaggedTensor(keys=list(SPARSE_KEYS), values=torch.tensor(values, dtype=torch.int64),
                             lengths=torch.tensor(lengths, dtype=torch.int32))


def make_batch(bags=None, scenario=None, seed: int = 0) -> Batch:
    bags = BAGS if bags is None else bags
    scenario = SCENARIO if scenario is None else scenario
    n = len(scenario)
    g = torch.Generator().manual_seed(seed)
    return Batch(
        sparse=make_kjt(bags),
        dense=torch.randn(n, 2, generator=g),
        labels=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])[:n],
        scenario=torch.tensor(scenario, dtype=torch.int64),
        rows=torch.arange(n, dtype=torch.int64),
    )


def make_empty_batch() -> Batch:
    return Batch(
        sparse=KeyedJaggedTensor(keys=list(SPARSE_KEYS), values=torch.zeros(0, dtype=torch.int64),
                                 lengths=torch.zeros(0, dtype=torch.int32), stride=0),
        dense=torch.zeros(0, 2),
        labels=torch.zeros(0, T),
        scenario=torch.zeros(0, dtype=torch.int64),
        rows=torch.zeros(0, dtype=torch.int64),
    )


@pytest.fixture
def model_data() -> FeatureSpec:
    return make_data_config()


@pytest.fixture
def batch4() -> Batch:
    return make_batch()


@pytest.fixture
def empty_batch() -> Batch:
    return make_empty_batch()
