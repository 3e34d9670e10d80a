"""What the model's gates and mixing weights do on real rows: `GateRecorder` for model_weights.json.

    with GateRecorder(model, scenario_names, task_names) as rec:   forward hooks while entered
        evaluate(...)                                              any forwards of `model`
    rec.summary(world_size)  (every rank calls it: an all-reduce where several ranks run)
      → {"scenario_names", "task_names",
         "gates":  {"level_<i>": {"gate_names": [task..., "shared"], "expert_names": [...],
                                  "rows": [S], "weights": [S][G][E] (null for a scenario with no rows)}},
         "mixing": {"scenario_own_weight": [S], "task_own_weight": [T],
                    "scenario_scale": [T], "task_scale": [T]}}   (absent without BalancedMixing)

Gate weights are the softmax over experts of a CGC level's gate logits (model/ple.py): the gates'
Linear, + the per-scenario bias (scenario_gates), + the level's mask (a task gate sees its own
task experts and the shared experts; masked experts get weight 0). The recorder recomputes them
from the level's input in a forward hook, so ple.py carries no hook of its own; the row's scenario
is taken from the Batch handed to the outermost module (a forward pre-hook). Means are over all
rows seen, per scenario: sums and counts, added over ranks by summary().
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from msrec_dist.batch import Batch
from msrec_dist.model.fields import FieldParts
from msrec_dist.model.mixing import BalancedMixing
from msrec_dist.model.ple import PLE, CGCLevel, level_inputs


def gate_weights(level: CGCLevel, x: torch.Tensor | FieldParts, onehot: torch.Tensor | None) -> torch.Tensor:
    """The softmax weights [G, B, E] that `level` gives its experts for input x (as its forward:
    [B, in], FieldParts or [T+1, B, in]) and the scenario one-hot [B, S] (scenario gates only)."""
    num_gates = level.mask.size(0)
    # a shared input ([B, in] or FieldParts) feeds every gate; group outputs give each gate its own row
    gate_in = x if isinstance(x, FieldParts) else level_inputs(x, level.expert_group, num_gates)[1]
    logits = level.gates(gate_in)  # [G, B, E]
    if level.scenario_gate_bias is not None:
        logits = logits + torch.matmul(onehot, level.scenario_gate_bias)  # [B, S] @ [G, S, E] → [G, B, E]
    return torch.softmax((logits + level.mask).float(), dim=-1)  # masked logits are -inf → weight 0


def expert_names(level: CGCLevel, task_names: list[str]) -> list[str]:
    """<task>_<k> for task t's k-th expert, shared_<k> for the shared ones (model/ple.py's order)."""
    num_tasks = len(task_names)
    groups = level.expert_group.tolist()
    names, seen = [], [0] * (num_tasks + 1)
    for owner in groups:
        names.append(f"{task_names[owner] if owner < num_tasks else 'shared'}_{seen[owner]}")
        seen[owner] += 1
    return names


def _find_batch(args: tuple, kwargs: dict) -> Batch | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, Batch):
            return value
    return None


class _LevelStats:
    """Sums of gate weights [S, G, E] and row counts [S] of one CGC level (float64, on the
    level's device so that a NCCL all-reduce can take them)."""

    def __init__(self, name: str, level: CGCLevel, num_scenarios: int) -> None:
        device = level.gates.weight.device
        self.name, self.level = name, level
        self.sums = torch.zeros(num_scenarios, level.mask.size(0), level.num_experts, dtype=torch.float64,
                                device=device)
        self.counts = torch.zeros(num_scenarios, dtype=torch.float64, device=device)


class GateRecorder:
    """Mean gate weights per scenario × gate of every CGC level of every PLE inside `model`
    (DMP / DDP wrappers included), recorded by forward hooks while the recorder is entered."""

    def __init__(self, model: nn.Module, scenario_names: list[str], task_names: list[str]) -> None:
        self.model = model
        self.scenario_names, self.task_names = list(scenario_names), list(task_names)
        ples = [m for m in model.modules() if isinstance(m, PLE)]
        self._levels: list[_LevelStats] = []
        for p, ple in enumerate(ples):
            prefix = "" if len(ples) == 1 else f"ple_{p}."  # one PLE in every model of the zoo
            for i, level in enumerate(ple.levels):
                self._levels.append(_LevelStats(f"{prefix}level_{i}", level, len(self.scenario_names)))
        self._mixing = [m for m in model.modules() if isinstance(m, BalancedMixing)]
        self._scenario: torch.Tensor | None = None  # [B] of the forward under way
        self._handles: list[Any] = []

    def __enter__(self) -> "GateRecorder":
        if self._handles:
            raise RuntimeError("GateRecorder is already entered")
        self._handles.append(self.model.register_forward_pre_hook(self._grab_scenario, with_kwargs=True))
        for stats in self._levels:
            self._handles.append(stats.level.register_forward_hook(self._recorder(stats), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._scenario = None

    def _grab_scenario(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        batch = _find_batch(args, kwargs)
        self._scenario = batch.scenario if batch is not None else None

    def _recorder(self, stats: _LevelStats):
        def hook(module: CGCLevel, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            # a post-hook: the forward has filled FieldParts' caches with tensors that carry its
            # autograd graph; this no-grad recompute only reads them
            if self._scenario is None:
                raise RuntimeError("GateRecorder: a CGC level ran without a Batch passed to the recorded model")
            x = args[0] if args else kwargs["x"]
            onehot = args[1] if len(args) > 1 else kwargs.get("onehot")
            with torch.no_grad():
                weights = gate_weights(module, x, onehot)  # [G, B, E]
                scenario = self._scenario.to(stats.sums.device)  # [B]
                if scenario.numel() != weights.size(1):
                    raise RuntimeError(f"GateRecorder: the batch has {scenario.numel()} rows, "
                                       f"{stats.name} saw {weights.size(1)}")
                stats.sums.index_add_(0, scenario, weights.transpose(0, 1).to(torch.float64))  # [B, G, E] by row
                stats.counts.index_add_(0, scenario, torch.ones_like(scenario, dtype=torch.float64))
        return hook

    def summary(self, world_size: int = 1) -> dict:
        """The JSON-able means (module docstring). With world_size > 1 and a process group, the
        sums and counts are all-reduced first: every rank must call it, in the same order."""
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            for stats in self._levels:  # the same order on every rank: model.modules()'s
                dist.all_reduce(stats.sums)
                dist.all_reduce(stats.counts)
        num_tasks = len(self.task_names)
        gates = {}
        for stats in self._levels:
            num_gates = stats.sums.size(1)
            counts = stats.counts.cpu()
            means = (stats.sums.cpu() / counts.clamp(min=1).view(-1, 1, 1)).tolist()  # [S][G][E]
            gates[stats.name] = {
                "gate_names": self.task_names[:num_gates] + (["shared"] if num_gates > num_tasks else []),
                "expert_names": expert_names(stats.level, self.task_names),
                "rows": [int(c) for c in counts.tolist()],
                "weights": [m if c > 0 else None for m, c in zip(means, counts.tolist())],
            }
        out: dict = {"scenario_names": self.scenario_names, "task_names": self.task_names, "gates": gates}
        if self._mixing:
            out["mixing"] = mixing_summary(self._mixing[0])
        return out


def own_weights(theta: torch.Tensor) -> list[float]:
    """σ(θ) [K]: the weight of a row's own scenario (task) expert; 1 where K = 1
    (model/mixing.py's balanced_mixing_matrix: one expert takes everything)."""
    if theta.numel() == 1:
        return [1.0]
    return torch.sigmoid(theta.detach().float()).cpu().tolist()


def mixing_summary(mixing: BalancedMixing) -> dict:
    """BalancedMixing's learned weights: own-expert weights [S] and [T], scales [T] each."""
    return {
        "scenario_own_weight": own_weights(mixing.scenario_theta),
        "task_own_weight": own_weights(mixing.task_theta),
        "scenario_scale": mixing.scenario_scale.detach().float().flatten().cpu().tolist(),  # [T, 1, 1] → [T]
        "task_scale": mixing.task_scale.detach().float().flatten().cpu().tolist(),
    }


__all__ = ["GateRecorder", "expert_names", "gate_weights", "mixing_summary"]
