"""Replicated tables' optimizer (msrec_dist/dist/replicated.py): the same update as fbgemm's fused
row-wise Adagrad kernel (the one model-parallel tables use), and the fused kernel's state layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

from msrec_dist.dist.replicated import FUSED_ROWWISE_ADAGRAD_EPS, ReplicatedTableOptimizer

ROWS, D, LR = 50, 8, 0.1
KEY = "model.embedding.ebc.embedding_bags.user.weight"


def _bags(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """indices, offsets of 6 bags over ROWS rows (repeats and an empty bag included)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 0, 2, 5, 1, 4])
    indices = torch.randint(0, ROWS // 2, (int(lengths.sum()),), generator=gen)  # rows >= 25 never seen
    return indices, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def _fused_table(weights: torch.Tensor, optimizer: EmbOptimType) -> SplitTableBatchedEmbeddingBagsCodegen:
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(ROWS, D, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=optimizer, learning_rate=LR,
        eps=FUSED_ROWWISE_ADAGRAD_EPS, pooling_mode=PoolingMode.SUM)
    tbe.split_embedding_weights()[0].copy_(weights)
    return tbe


@pytest.mark.parametrize("kind,fused", [("rowwise_adagrad", EmbOptimType.EXACT_ROWWISE_ADAGRAD),
                                        ("sgd", EmbOptimType.EXACT_SGD)])
def test_same_updates_as_the_fused_kernel(kind, fused):
    torch.manual_seed(0)
    w0 = torch.randn(ROWS, D)
    tbe = _fused_table(w0, fused)
    weight = torch.nn.Parameter(w0.clone())
    opt = ReplicatedTableOptimizer({KEY: weight}, {KEY: "user"}, kind, LR)
    for step in range(3):  # state carries over steps
        indices, offsets = _bags(step)
        upstream = torch.randn(6, D)
        tbe(indices, offsets).backward(upstream)  # the fused kernel updates in backward
        dense = F.embedding_bag(indices, weight, offsets, mode="sum", include_last_offset=True)
        dense.backward(upstream)  # a dense gradient, for the replicated optimizer
        opt.step()
        opt.zero_grad()
    fused_w = tbe.split_embedding_weights()[0]
    assert not torch.equal(fused_w, w0)
    torch.testing.assert_close(weight.detach(), fused_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.detach()[ROWS // 2:], w0[ROWS // 2:], rtol=0, atol=0)  # unseen rows
    if kind == "rowwise_adagrad":
        (momentum,) = opt.state_dict()["state"][KEY].values()
        torch.testing.assert_close(momentum, tbe.split_optimizer_states()[0][0], rtol=1e-5, atol=1e-7)


def test_state_dict_has_the_fused_layout():
    """{param key: {"<table>.momentum1": [rows]}}, as torchrec's fused optimizer names it."""
    weight = torch.nn.Parameter(torch.zeros(ROWS, D))
    sd = ReplicatedTableOptimizer({KEY: weight}, {KEY: "user"}, "rowwise_adagrad", LR).state_dict()
    assert list(sd["state"]) == [KEY]
    assert {k: tuple(v.shape) for k, v in sd["state"][KEY].items()} == {"user.momentum1": (ROWS,)}
    assert ReplicatedTableOptimizer({KEY: weight}, {KEY: "user"}, "sgd", LR).state_dict()["state"] == {}
    with pytest.raises(ValueError, match="rowwise_adagrad"):
        ReplicatedTableOptimizer({KEY: weight}, {KEY: "user"}, "adam", LR)
