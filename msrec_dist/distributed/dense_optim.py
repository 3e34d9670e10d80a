"""The dense optimizer's Adam: torch's fused Adam with a short path for the steady state.

    step() ──same params, same .grad tensors, state built, no hooks/closure/AMP──►
        torch._foreach_add_(steps, 1); torch._fused_adam_(...)   (lists kept from the last step)
    otherwise ──► torch.optim.Adam.step (fused=True), then the lists are rebuilt

Why by hand: torch.optim.Adam.step re-walks every group each step (_init_group builds the
param/grad/state lists, _group_tensors_by_device_and_dtype regroups them) before the one fused
kernel; for ple's 15 dense tensors that Python takes longer than the kernel (0.34 vs 0.15 ms a
step on CPU). The gradients are views of one flat buffer that stay
bound step after step (msrec_dist/distributed/grad_sync.FlatGrads), so the lists do not change. The
kernel, the arguments and the state (and so state_dict / checkpoints) are torch's own.

The per-parameter step counters (0-dim tensors, as torch keeps them) become views of one tensor
per group when the lists are built, so one add_ counts the step for all of them: on CPU
torch._foreach_add_ is a loop of one add_ per tensor.
"""
from __future__ import annotations

from typing import Optional

import torch

# group options under which torch's fused Adam is exactly the two calls of the short path
_PLAIN = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False,
          "decoupled_weight_decay": False}


def _torch_adam_step(optimizer: torch.optim.Adam, closure):
    """torch.optim.Adam.step without torch's hook wrapper, which it gains once any plain Adam is
    made (the wrapper around FusedAdam.step already ran the hooks)."""
    step = torch.optim.Adam.step
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    return step(optimizer, closure)


class FusedAdam(torch.optim.Adam):
    def __init__(self, params, **kwargs) -> None:
        kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)
        self._lists: Optional[list[tuple]] = None  # per group: (group, params, grads, exp_avgs, exp_avg_sqs, steps, [n] steps)

    def _build_lists(self) -> Optional[list[tuple]]:
        """The per-group tensor lists of the short path, or None where torch's path must run."""
        lists = []
        for group in self.param_groups:
            if (not group.get("fused") or any(group.get(k, v) != v for k, v in _PLAIN.items())
                    or isinstance(group["lr"], torch.Tensor)):
                return None
            params = group["params"]
            if any(p.grad is None or p.grad.is_sparse or "exp_avg" not in self.state[p] for p in params):
                return None
            states = [self.state[p] for p in params]
            steps = torch.stack([s["step"] for s in states])  # [n]: the counters, in one tensor
            for i, s in enumerate(states):
                s["step"] = steps[i]  # a 0-dim view: same value, same dtype, still the state's own
            lists.append((group, list(params), [p.grad for p in params], [s["exp_avg"] for s in states],
                          [s["exp_avg_sq"] for s in states], [s["step"] for s in states], steps))
        return lists

    def _short_path_ok(self) -> bool:
        if self._lists is None:
            return False
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        return all(p.grad is g for _, params, grads, *_ in self._lists for p, g in zip(params, grads))

    # torch wraps this step (Optimizer._patch_step_function) with the profiler range and the step
    # hooks, so both paths run them once
    @torch.no_grad()
    def step(self, closure=None):
        if closure is None and self._short_path_ok():
            for group, params, grads, exp_avgs, exp_avg_sqs, steps, all_steps in self._lists:
                beta1, beta2 = group["betas"]
                all_steps.add_(1)  # every view in steps counts the step
                torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                                   lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                   eps=group["eps"], maximize=False)
            return None
        loss = _torch_adam_step(self, closure)
        self._lists = self._build_lists()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._lists = None  # the state tensors were replaced

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        self._lists = None
