"""Replicated tables' optimizer (msrec_dist/distributed/replicated.py): the same update as fbgemm's fused
row-wise Adagrad kernel (the one model-parallel tables use), and the fused kernel's state layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

import msrec_dist.distributed.replicated as replicated
from msrec_dist.kernels.native import HAVE_CSRC
from msrec_dist.distributed.replicated import FUSED_ROWWISE_ADAGRAD_EPS, ReplicatedTableOptimizer, rowwise_adagrad_

needs_csrc = pytest.mark.skipif(not HAVE_CSRC, reason="msrec_dist._C not built (MSREC_BUILD_CSRC=1 make setup)")

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


@pytest.mark.parametrize("kind,fused,one_pass", [("rowwise_adagrad", EmbOptimType.EXACT_ROWWISE_ADAGRAD, True),
                                                  ("rowwise_adagrad", EmbOptimType.EXACT_ROWWISE_ADAGRAD, False),
                                                  ("sgd", EmbOptimType.EXACT_SGD, False)])
def test_same_updates_as_the_fused_kernel(kind, fused, one_pass, monkeypatch):
    """one_pass: csrc/rowwise_adagrad.cpp's op; else the torch ops (the fallback)."""
    if one_pass and not HAVE_CSRC:
        pytest.skip("msrec_dist._C not built")
    if not one_pass:
        monkeypatch.setattr(replicated, "one_pass_rowwise_adagrad", lambda *a: False)
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


def _sparse_grad(rows: int, dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A table gradient with ~30% of its rows nonzero, one row holding only -0.0 and one only a
    denormal value (nonzero: must be updated)."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.zeros(rows, dim, dtype=dtype)
    hit = torch.randperm(rows, generator=gen)[: rows * 3 // 10]
    grad[hit] = torch.randn(len(hit), dim, generator=gen, dtype=dtype)
    grad[hit[:5], 1:] = 0.0  # rows with a single nonzero
    grad[rows - 1] = -0.0
    grad[rows - 2, 3] = torch.finfo(dtype).tiny / 4  # denormal
    return grad


@needs_csrc
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_pass_update_equals_the_torch_update(dtype, tol, threads):
    """The op updates the rows with a nonzero gradient as rowwise_adagrad_ updates them (up to the
    order of the D squares' sum), leaves the others bitwise, and leaves the gradient all zeros."""
    rows, dim, lr, eps = 5000, 16, 0.05, 1e-8  # rows > the op's 2048-row grain: several chunks
    torch.manual_seed(1)
    weight, momentum = torch.randn(rows, dim, dtype=dtype), torch.rand(rows, dtype=dtype)
    grad = _sparse_grad(rows, dim, dtype, seed=2)
    touched = grad.view(torch.int32 if dtype == torch.float32 else torch.int64).ne(0).any(1)
    original, want_w, want_m = weight.clone(), weight.clone(), momentum.clone()
    rowwise_adagrad_(want_w, grad.clone(), want_m, lr, eps)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = torch.ops.msrec.rowwise_adagrad_dense_(weight, grad, momentum, lr, eps)
    finally:
        torch.set_num_threads(before)
    assert n == int(touched.sum()) and touched[rows - 1] and touched[rows - 2]
    assert torch.count_nonzero(grad) == 0
    torch.testing.assert_close(weight, want_w, rtol=tol, atol=tol)
    torch.testing.assert_close(momentum, want_m, rtol=tol, atol=tol)
    assert not torch.equal(weight[touched], original[touched])  # the touched rows did move
    untouched = ~touched
    assert torch.equal(weight[untouched], want_w[untouched]) and torch.equal(momentum[untouched], want_m[untouched])


@needs_csrc
def test_one_pass_update_rejects_what_it_cannot_take():
    w, g, m = torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4)
    op = torch.ops.msrec.rowwise_adagrad_dense_
    with pytest.raises(RuntimeError, match="contiguous"):
        op(w, torch.zeros(3, 4).t(), m, 0.1, 1e-8)
    with pytest.raises(RuntimeError, match="one shape"):
        op(w, torch.zeros(4, 2), m, 0.1, 1e-8)
    with pytest.raises(RuntimeError, match=r"momentum must be \[rows\]"):
        op(w, g, torch.zeros(5), 0.1, 1e-8)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(w, g, torch.zeros(4, dtype=torch.float64), 0.1, 1e-8)


def test_zero_grad_drops_the_gradient_so_the_next_backward_is_not_added_in():
    """DenseStep zeroes the replicated tables' gradients by setting them to None: the next
    backward's gradient is then the table's gradient as is, not added into the last one."""
    weight = torch.nn.Parameter(torch.randn(ROWS, D))
    opt = ReplicatedTableOptimizer({KEY: weight}, {KEY: "user"}, "rowwise_adagrad", LR)

    def loss(w, seed):
        indices, offsets = _bags(seed)
        return F.embedding_bag(indices, w, offsets, mode="sum", include_last_offset=True).square().sum()
    loss(weight, 0).backward()
    opt.step()
    opt.zero_grad()
    assert weight.grad is None
    loss(weight, 1).backward()
    (expected,) = torch.autograd.grad(loss(weight, 1), [weight])  # this batch's gradient alone
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=0)
