"""A run's checkpoint → one unsharded model on CPU, in eval mode.

    RUN_DIR/config.json ──► ExperimentConfig; its data.yaml ──► FeatureSpec (files not needed)
    RUN_DIR/checkpoints/{best | step_N (latest) | step_N} ──DCP load──► MultiTaskTrainModule

The checkpoint may come from any world size: DCP reads the saved shards (ShardedTensors of the
row- or table-wise sharded tables, replicated dense weights) into the plain tensors of the
unsharded module. No process group is started.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from msrec_dist.config import ExperimentConfig, load_experiment
from msrec_dist.distributed.checkpoint import best_checkpoint, checkpoint_dirs, read_progress
from msrec_dist.features import FeatureSpec
from msrec_dist.model.config import Kernel
from msrec_dist.model.zoo import MultiTaskTrainModule, build_model
from msrec_dist.typed_yaml import ConfigError, from_dict, load_yaml

_STEP = re.compile(r"^step_(\d+)$")


@dataclass
class Trained:
    cfg: ExperimentConfig
    features: FeatureSpec
    model: nn.Module  # the network (build_model's), eval mode, CPU
    checkpoint: str  # the directory loaded
    which: str  # best | latest | step_N, as asked
    step: int  # the optimizer step the weights are from
    selection: dict  # a best checkpoint's metric and val score ({} for step_N)


def load_features(data_yaml: str) -> FeatureSpec:
    """The features of a data.yaml, without resolving its files (they may be gone)."""
    raw = load_yaml(data_yaml)
    return from_dict(FeatureSpec, {k: raw[k] for k in ("scenario", "tasks", "sparse", "dense") if k in raw},
                     data_yaml)


def resolve_checkpoint(run_dir: str, which: str) -> tuple[str, int, dict]:
    """(directory, step, best.json's metric and score or {}) of `which` (best | latest | step_N)
    under RUN_DIR/checkpoints."""
    root = os.path.join(run_dir, "checkpoints")
    if which == "best":
        found = best_checkpoint(root)
        if found is None:
            raise ConfigError(f"{run_dir}: no best checkpoint (checkpoints/best is written when the run has a val "
                              "split and train.keep_best); use --checkpoint latest or step_N")
        return found[0], int(found[1]["step"]), {k: found[1][k] for k in ("metric", "score") if k in found[1]}
    steps = checkpoint_dirs(root)
    if which == "latest":
        if not steps:
            raise ConfigError(f"{run_dir}: no complete checkpoint under {root}")
        return steps[-1][1], steps[-1][0], {}
    m = _STEP.match(which)
    if not m:
        raise ConfigError(f"--checkpoint must be best, latest or step_N, got {which!r}")
    for step, path in steps:
        if step == int(m.group(1)):
            return path, step, {}
    raise ConfigError(f"{run_dir}: no complete checkpoint {which} (have: {[f'step_{s}' for s, _ in steps] or 'none'})")


def load_trained(run_dir: str, which: str = "best", kernels: Kernel | None = None) -> Trained:
    """The run's model with the weights of checkpoint `which`; `kernels` overrides model.kernels."""
    run_dir = os.path.abspath(run_dir)
    config = os.path.join(run_dir, "config.json")
    if not os.path.exists(config):
        raise ConfigError(f"{run_dir}: not a run directory (no config.json)")
    cfg = load_experiment(config)
    if kernels is not None:
        cfg.model.kernels = kernels
    features = load_features(cfg.data)
    path, step, selection = resolve_checkpoint(run_dir, which)
    if os.path.exists(os.path.join(path, "progress.json")):
        step = read_progress(path)[0].step
    torch.manual_seed(0)  # the weights all come from the checkpoint; this only fixes the throwaway init
    module = MultiTaskTrainModule(build_model(cfg.model, features), cfg.train.task_weights)
    state = {"model": module.state_dict()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    module.load_state_dict(state["model"])  # strict: a key the run's model lacks is an error
    module.eval()
    return Trained(cfg, features, module.model, path, which, step, selection)

