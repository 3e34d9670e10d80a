"""The dense optimizer step (msrec_dist/training/step.py): FlatGrads (gradients as
views of one buffer, clipped and zeroed at once) against torch's per-tensor clip_grad_norm_ and
zero_grad(set_to_none=True), and DenseStep's fallback when the views get replaced."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn

from msrec_dist.distributed.grad_sync import FlatGrads
from msrec_dist.training.step import DenseStep


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 1))


def _state(model: nn.Module, lr: float = 0.01) -> SimpleNamespace:
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return SimpleNamespace(dense_params=params, dense_optimizer=opt, scheduler=sched, replicated_optimizer=None,
                           grad_sync=None)


def _batches(n: int = 6):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 7, generator=gen) * 5, torch.randn(32, 1, generator=gen)) for _ in range(n)]


def test_flat_clip_matches_clip_grad_norm():
    a = _model()
    b = copy.deepcopy(a)
    flat = FlatGrads(list(a.parameters()))
    x, y = _batches(1)[0]
    for m in (a, b):
        nn.functional.mse_loss(m(x), y).backward()
    want = nn.utils.clip_grad_norm_(list(b.parameters()), 0.5)
    got = flat.clip_(0.5)
    assert want > 0.5  # the clip is active
    torch.testing.assert_close(got, want)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
        assert pa.grad.data_ptr() >= flat.buffer.data_ptr()  # still a view of the buffer
    assert flat.bound()


def test_dense_step_same_training_as_per_tensor_path():
    """Several clipped Adam steps: FlatGrads path == torch's per-tensor path (set_to_none)."""
    a = _model()
    b = copy.deepcopy(a)
    step_a, step_b = DenseStep(_state(a), grad_clip=1.0), DenseStep(_state(b), grad_clip=1.0)
    step_b.flat.buffer = None  # force the per-tensor path
    for x, y in _batches():
        for m, step in ((a, step_a), (b, step_b)):
            nn.functional.mse_loss(m(x), y).backward()
            step.step()
    assert step_a.flat.bound() and not step_b.flat.bound()
    assert all(p.grad is None for p in b.parameters())  # per-tensor path: set to None
    assert all(float(p.grad.abs().sum()) == 0.0 for p in a.parameters())  # flat path: zeroed views
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_replaced_grads_fall_back_to_torch():
    """A caller that sets grads to None (or DDP swapping in bucket views) unbinds the buffer;
    DenseStep then clips and zeroes per tensor, and the update still happens."""
    a = _model()
    step = DenseStep(_state(a), grad_clip=1.0)
    x, y = _batches(1)[0]
    a.zero_grad(set_to_none=True)
    assert not step.flat.bound()
    nn.functional.mse_loss(a(x), y).backward()
    before = [p.detach().clone() for p in a.parameters()]
    step.step()
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert all(p.grad is None for p in a.parameters())


def test_mixed_dtypes_are_not_flattened():
    lin = nn.Linear(3, 3)
    lin.bias.data = lin.bias.data.double()
    flat = FlatGrads(list(lin.parameters()))
    assert flat.buffer is None and not flat.bound()
