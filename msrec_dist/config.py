"""Typed experiment configs: one YAML file per model in configs/, parsed once into dataclasses.

    configs/<model>.yaml ──load_experiment(path, data=None, overrides=[])──► ExperimentConfig
        .data     path of the data config (msrec_dist/data/schema.py parses that file)
        .model    ModelConfig   (which blocks are on, their widths)   → msrec_dist/model/zoo.py
                  (defined in msrec_dist/model/config.py)
        .train    TrainConfig   (optimizers, steps, checkpoints)      → msrec_dist/training/loop.py
        .reader   ReaderConfig  (batch size, workers, split mode)     → msrec_dist/data/reader.py
        .sharding ShardingConfig (planner constraints per table)      → msrec_dist/distributed/sharding.py
        .run      RunConfig     (run directory, seed, logging)

Every block of the model is switchable here, so baselines and ablations are configs, not code.
Unknown keys and wrong types fail naming the file and key path (typed_yaml.from_dict).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from msrec_dist.data.schema import ReaderConfig
from msrec_dist.model.config import (AttentionConfig, BottomConfig, ExpertsConfig, Kernel, MixingConfig, ModelConfig,
                                     StarConfig, TowerConfig)
from msrec_dist.typed_yaml import ConfigError, apply_overrides, from_dict, load_yaml

# The model's configs live next to the model (msrec_dist/model/config.py); re-exported here.
__all__ = ["AttentionConfig", "BottomConfig", "EarlyStopConfig", "ExperimentConfig", "ExpertsConfig", "Kernel", "MixingConfig",
           "ModelConfig", "ReaderConfig", "RunConfig", "ShardingConfig", "StarConfig", "TableConstraint",
           "TowerConfig", "TrainConfig", "load_experiment"]


@dataclass
class EarlyStopConfig:
    """Stop when the val metric has not improved for `patience` evaluations (0: never stop early).

    metric: mean_auc (the mean AUC over the scenario × task cells), logloss (their mean logloss,
    lower is better), or one cell: <scenario>/<task> (its AUC) or <scenario>/<task>/logloss;
    <scenario> may be `overall`. The same metric picks the best checkpoint."""
    metric: str = "mean_auc"
    patience: int = 0
    min_delta: float = 0.0  # an improvement smaller than this does not count

    def validate(self, where: str) -> None:
        parts = self.metric.split("/")
        if not (self.metric in ("mean_auc", "logloss") or len(parts) == 2 or (len(parts) == 3 and parts[2] == "logloss")):
            raise ConfigError(f"{where}.metric: expected mean_auc, logloss, <scenario>/<task> or "
                              f"<scenario>/<task>/logloss, got {self.metric!r}")
        if self.patience < 0 or self.min_delta < 0:
            raise ConfigError(f"{where}: patience and min_delta must be >= 0")


@dataclass
class TrainConfig:
    # supervised: the tasks' loss; pretrain: SASS's scenario-contrastive stage 1 (model.arch sass;
    # msrec_dist/model/sass.py), no labels used, no val/eval metrics; its run is the --init-from
    # source of the supervised stage 2
    stage: Literal["supervised", "pretrain"] = "supervised"
    epochs: int = 1
    max_steps: int = 0  # 0 = no limit
    sparse_optimizer: Literal["rowwise_adagrad", "sgd", "adagrad", "adam"] = "rowwise_adagrad"
    sparse_lr: float = 0.05
    dense_optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    dense_lr: float = 0.005
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_decay: Literal["none", "cosine", "linear"] = "none"
    grad_clip: float = 10.0
    task_weights: list[float] = field(default_factory=list)  # [] = 1 per task
    # sparse_dist = torchrec's TrainPipelineSparseDist (input dist overlapped with compute);
    # auto = sparse_dist on CUDA, the plain loop on CPU (exact global-batch loss weighting)
    pipeline: Literal["auto", "sparse_dist", "plain"] = "auto"
    # how data-parallel gradients are averaged over ranks (msrec_dist/distributed/grad_sync.py): ddp =
    # torch DDP buckets overlapped with backward; flat = one all-reduce after backward; auto =
    # ddp on CUDA, flat on CPU (gloo)
    grad_sync: Literal["auto", "ddp", "flat"] = "auto"
    # how the loop's sums over ranks travel when every rank is on one host (grad_sync flat's
    # all-reduce, the has-data agreement, STAR's partitioned-norm statistics;
    # msrec_dist/distributed/collectives.py): shm = a shared-memory segment, waits spin (C++ op, needs
    # msrec_dist._C); gloo = gloo point-to-point exchanges; auto = shm where it can (gloo backend,
    # one host, the op built, a core per rank), gloo elsewhere. NCCL (CUDA) uses its own all-reduce.
    host_reduce: Literal["auto", "shm", "gloo"] = "auto"
    # seconds a rank waits for its peers in a collective (the gloo process group's timeout and the
    # shared-memory sums', which then name the rank that never came) before it fails
    collective_timeout_s: float = 300.0
    # a NaN/inf forward loss on any rank (checked before backward, every rank alike): stop = raise
    # NonFiniteLoss, no checkpoint after it; skip_batch = no backward or optimizer step for that batch
    nan_policy: Literal["stop", "skip_batch"] = "stop"
    # in training, each id of a feature with an oov_id (data config) is replaced by that row with
    # this probability, so the row ids unseen in train map to learns (training/oov_dropout.py)
    oov_dropout: float = 0.0
    oov_dropout_features: list[str] = field(default_factory=list)  # [] = every feature with an oov_id
    # evaluation on the val split during training (model selection): every N steps, or at each
    # epoch's end ('epoch'), and at the end of training; 0 = never. Without a val split: never.
    eval_every: int | Literal["epoch"] = "epoch"
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    # with val evaluations: checkpoints/best keeps the best weights by early_stop.metric, and the
    # eval split is scored with them; false: with the last weights
    keep_best: bool = True
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 50


@dataclass
class TableConstraint:
    sharding_types: list[str] = field(default_factory=list)
    compute_kernels: list[str] = field(default_factory=list)


@dataclass
class ShardingConfig:
    constraints: dict[str, TableConstraint] = field(default_factory=dict)
    # world > 1 or CPU: tables of at most this many MB are replicated (data_parallel: no all-to-alls,
    # their gradient all-reduced); 0 = every table model-parallel. See msrec_dist/distributed/sharding.py.
    replicate_max_mb: float = 1.0
    hbm_gb: float = 0.0  # per-rank memory budget for the planner; 0 = torchrec's default
    ddr_gb: float = 0.0

    def validate(self, where: str) -> None:
        if self.replicate_max_mb < 0:
            raise ConfigError(f"{where}: replicate_max_mb must be >= 0, got {self.replicate_max_mb}")


@dataclass
class RunConfig:
    dir: str = ""  # default runs/<model.name>
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True
    record_rows: bool = False  # write the global row ids each rank trained on (rows_rank<r>.txt)
    # the eval split's predictions (probabilities, labels, scenario) in eval_predictions.npz, for
    # the report's ROC curves and thresholds
    eval_predictions: bool = True


@dataclass
class ExperimentConfig:
    data: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_experiment(path: str, data: Optional[str] = None, overrides: tuple[str, ...] = ()) -> ExperimentConfig:
    """Parse configs/<model>.yaml (+ --data, + --set overrides) into an ExperimentConfig.

    A relative `data:` path in the YAML is relative to the YAML file; `--data` is taken as given.
    """
    raw = load_yaml(path)
    raw = apply_overrides(raw, list(overrides))
    if data is not None:
        raw["data"] = data
    elif raw.get("data") and isinstance(raw["data"], str) and not os.path.isabs(raw["data"]):
        raw["data"] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), raw["data"]))
    cfg = from_dict(ExperimentConfig, raw, where=path)
    if not cfg.data:
        raise ConfigError(f"{path}: data: no data config given (set `data:` or pass --data)")
    if not cfg.run.dir:
        cfg.run.dir = os.path.join("runs", cfg.model.name)
    return cfg
