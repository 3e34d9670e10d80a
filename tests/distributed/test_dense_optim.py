"""FusedAdam (msrec_dist/distributed/dense_optim.py) against torch.optim.Adam(fused=True): bitwise the same
parameters and state over steps with persistent gradient tensors (the short path), with replaced
gradients, after load_state_dict, with two groups, weight decay and a scheduled lr; step hooks
run once per step; the short path is taken exactly when nothing changed."""
from __future__ import annotations

import pytest
import torch

from msrec_dist.distributed import dense_optim
from msrec_dist.distributed.dense_optim import FusedAdam

SHAPES = [(4, 87, 64), (4, 1, 64), (3, 87, 4), (2, 64, 32), (7,)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def _groups(params):
    return [{"params": params[:3]}, {"params": params[3:], "lr": 0.01, "weight_decay": 0.1}]


@pytest.fixture
def torch_path_calls(monkeypatch):
    calls = []
    real = dense_optim._torch_adam_step

    def counted(opt, closure):
        calls.append(1)
        return real(opt, closure)
    monkeypatch.setattr(dense_optim, "_torch_adam_step", counted)
    return calls


def _run(opt_cls, steps: int, replace_grads_at=(), load_at=None):
    params = _params()
    opt = opt_cls(_groups(params), lr=0.002, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.zeros_like(p)
    for step in range(steps):
        if step in replace_grads_at:  # new gradient tensors (as after zero_grad(set_to_none=True))
            for p in params:
                p.grad = torch.zeros_like(p)
        for p in params:  # in place, as autograd accumulating into bound gradient views
            p.grad.copy_(torch.randn(p.shape, generator=g))
        if step == load_at:
            opt.load_state_dict(opt.state_dict())
        opt.step()
        sched.step()
    return params, opt


def test_same_parameters_and_state_as_torch(torch_path_calls):
    ref_params, ref = _run(torch.optim.Adam, 8, replace_grads_at=(5,), load_at=3)
    params, opt = _run(FusedAdam, 8, replace_grads_at=(5,), load_at=3)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for a, b in zip(opt.state.values(), ref.state.values()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert opt.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    # torch's path: the first step, after load_state_dict (step 3) and on new gradients (step 5)
    assert len(torch_path_calls) == 3


def test_short_path_in_the_steady_state(torch_path_calls):
    _run(FusedAdam, 6)
    assert len(torch_path_calls) == 1  # the first step builds the state; the other 5 take the short path


def test_hooks_run_once_per_step_on_both_paths():
    params = _params()
    opt = FusedAdam(params, lr=0.01)
    plain = torch.optim.Adam(_params(), lr=0.01)  # a plain Adam wraps torch's Adam.step in the hook wrapper too
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(3):
        opt.step()
    assert seen == ["pre", "post"] * 3
    del plain


def test_closure_and_amsgrad_take_torch_path(torch_path_calls):
    params = _params()
    opt = FusedAdam(params, lr=0.01, amsgrad=True)
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(3):
        opt.step()
    assert len(torch_path_calls) == 3 and opt._lists is None


def test_step_counters_count_with_one_add_and_save_as_plain_state(monkeypatch):
    """The short path counts the step with one add_ on the group's counters (views of one tensor),
    not torch._foreach_add_ (a loop of one add_ per parameter on CPU); the counters still save and
    load as torch's own 0-dim state."""
    params, opt = _run(FusedAdam, 2)  # state built (torch's path), lists built
    foreach_calls = []
    real = torch._foreach_add_
    monkeypatch.setattr(torch, "_foreach_add_", lambda *a, **k: (foreach_calls.append(1), real(*a, **k))[1])
    for _ in range(3):
        opt.step()
    assert foreach_calls == []
    steps = [opt.state[p]["step"] for p in params]
    assert all(s.dim() == 0 and s.item() == 5.0 for s in steps)
    assert steps[0].untyped_storage().data_ptr() == steps[2].untyped_storage().data_ptr()  # one tensor per group
    ref = torch.optim.Adam(_groups(_params()), lr=0.002, fused=True)
    ref.load_state_dict(opt.state_dict())
    assert [s["step"].item() for s in ref.state.values()] == [5.0] * len(params)
