"""Model config: which blocks of the multi-scenario model are on, and their widths.

    configs/<model>.yaml `model:` ──typed_yaml.from_dict──► ModelConfig → msrec_dist/model/zoo.py
        .attention AttentionConfig  (AutoInt over the fields)
        .star      StarConfig       (partitioned norm → star FC, auxiliary net)
        .bottom    BottomConfig     (plain MLP trunk when STAR is off)
        .experts   ExpertsConfig    (CGC/PLE levels; MMoE = 1 level)
        .mixing    MixingConfig     (balanced scenario/task mixing)
        .tower     TowerConfig      (one MLP per task)
        .arch      msrec | m3oe | pepnet | sass: which network (.m3oe M3oEConfig, .pepnet
                   PEPNetConfig, .sass SASSConfig)

Next to the model so that the model imports no experiment config (msrec_dist/config.py imports
this one into ExperimentConfig). Plain dataclasses: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from msrec_dist.typed_yaml import ConfigError

Kernel = Literal["auto", "triton", "cpp", "reference"]


@dataclass
class AttentionConfig:
    """AutoInt-style multi-head self-attention over feature fields (residual, ReLU)."""
    enabled: bool = True
    heads: int = 2
    head_dim: int = 8
    layers: int = 1


@dataclass
class StarConfig:
    """STAR scenario adaptation: partitioned norm → star-topology FC stack (+ auxiliary net)."""
    enabled: bool = True
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    partitioned_norm: bool = True
    norm_momentum: float = 0.1
    aux_net: bool = True
    aux_hidden: list[int] = field(default_factory=lambda: [32])
    aux_input: Literal["mean", "concat"] = "mean"  # the fields the auxiliary net sees: their mean, or all
    scenario_emb_dim: int = 8


@dataclass
class BottomConfig:
    """Plain shared MLP trunk, used when STAR is disabled ([] = flattened fields as they are)."""
    hidden: list[int] = field(default_factory=list)


@dataclass
class ExpertsConfig:
    """CGC/PLE experts: `levels` stacked CGC layers. MMoE = 1 level, 0 task experts."""
    kind: Literal["none", "cgc"] = "cgc"
    levels: int = 2
    shared_experts: int = 2
    task_experts: int = 1
    hidden: int = 64
    scenario_gates: bool = False  # + per-scenario gate logits (each scenario weighs the experts its own way)
    residual: bool = False  # + the trunk output itself (trunk width must equal hidden): towers keep the STAR features

    def validate(self, where: str) -> None:
        if self.kind == "cgc" and (self.levels < 1 or self.shared_experts + self.task_experts < 1):
            raise ConfigError(f"{where}: cgc needs levels >= 1 and at least one expert")


@dataclass
class MixingConfig:
    """Balanced scenario/task expert mixing added to the expert mix before the towers."""
    enabled: bool = True
    hidden: int = 64
    own_weight_init: float = 0.5  # initial α_d (and β_t): weight of a row's own scenario (task) expert
    scale_init: float = 0.5  # initial weights of the scenario and task mixes in the sum


@dataclass
class TowerConfig:
    hidden: list[int] = field(default_factory=lambda: [32])
    # one tower per (scenario, task), each row read by its scenario's (as M3oE's towers), instead
    # of one per task shared by the scenarios
    per_scenario: bool = False


@dataclass
class M3oEConfig:
    """M3oE (Zhang et al., SIGIR 2024), msrec_dist/model/m3oe.py: a STAR-style domain bottom,
    then shared experts (one softmax gate per (domain, task)), one expert per domain and one per
    task, fused with the two-level balance, and one tower per (domain, task). Defaults: the
    authors' code (github.com/Applied-Machine-Learning-Lab/M3oE, examples/run_movielens.py)."""
    # star layer width, then the widths of its Linear+LayerNorm+ReLU layers; a skip branch maps
    # the fields to the last width ([] = no bottom: the experts read the flattened fields)
    bottom: list[int] = field(default_factory=lambda: [512, 256])
    expert_hidden: list[int] = field(default_factory=lambda: [64])  # every expert: Linear+LayerNorm+ReLU per width
    shared_experts: int = 4  # the authors' expert_num
    # the learned weights are sigmoid(logit); these are the initial logits (authors: all 1 → 0.73)
    domain_fusion_init: float = 1.0  # weight of the domain module in the fused output (exp_d)
    task_fusion_init: float = 1.0  # weight of the task module (exp_t)
    domain_balance_init: float = 1.0  # α: own domain expert α, each other (1 − α)/(S − 1) (bal_d)
    task_balance_init: float = 1.0  # β: the same over the task experts (bal_t)
    # the shared-expert gates read the bottom detached (no gradient into it), as the authors' code
    detach_gates: bool = True

    def validate(self, where: str) -> None:
        if self.shared_experts < 1 or not self.expert_hidden or min(self.expert_hidden + self.bottom, default=1) < 1:
            raise ConfigError(f"{where}: m3oe needs shared_experts >= 1, a non-empty expert_hidden and "
                              f"positive widths, got {self.shared_experts}, {self.expert_hidden}, {self.bottom}")


@dataclass
class PEPNetConfig:
    """PEPNet (Chang et al., KDD 2023): EPNet scales the embedding fields by a gate on the
    scenario (and `domain_features`); PPNet scales each tower layer by a gate on the personal
    (user / item) features; msrec_dist/model/pepnet.py."""
    epnet: bool = True
    ppnet: bool = True  # needs model.tower.hidden: it scales the towers' hidden layers
    gate_hidden: int = 64  # width of each Gate NU's hidden layer
    gamma: float = 2.0  # gate = gamma * sigmoid(.), in (0, gamma); the paper's 2 centres it on 1
    epnet_gate: Literal["field", "element"] = "field"  # one EPNet gate per field, or per embedding element
    # sparse features whose embeddings join the scenario one-hot as the EPNet gate's domain input
    domain_features: list[str] = field(default_factory=list)
    # sparse features whose embeddings feed the PPNet gates (e.g. user and item ids); [] = all sparse
    personal_features: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if self.gate_hidden < 1 or self.gamma <= 0:
            raise ConfigError(f"{where}: gate_hidden must be >= 1 and gamma > 0, "
                              f"got {self.gate_hidden}, {self.gamma}")


@dataclass
class SASSConfig:
    """SASS (Zhang et al., CIKM 2022), msrec_dist/model/sass.py: scenario-adaptive transfer layers
    (a shared and a per-scenario layer with an adaptive and an update gate each) and the user view
    its scenario-contrastive pre-training (train.stage: pretrain) contrasts."""
    hidden: list[int] = field(default_factory=lambda: [128, 64])  # widths of the transfer layers
    user_id_feature: str = "user_id"  # the sparse feature whose id says which rows are the same user
    user_fields: list[str] = field(default_factory=list)  # the user view's fields; [] = the user id alone
    projection: list[int] = field(default_factory=lambda: [64, 32])  # the pre-training head's widths
    temperature: float = 0.1  # InfoNCE's τ
    # fields zeroed in the scenario view only (stage 1's augmentation): without the user id there,
    # the views of one user share no id and the loss must match them through the other fields
    view_drop: list[str] = field(default_factory=list)
    # msrec's network (model.arch msrec) with the transfer layers (widths `hidden`) as its trunk, in
    # place of STAR or the MLP (model.star.enabled must be false)
    block: bool = False

    def validate(self, where: str) -> None:
        if not self.hidden or min(self.hidden) < 1 or not self.projection or self.temperature <= 0:
            raise ConfigError(f"{where}: sass needs hidden and projection widths and temperature > 0, got "
                              f"{self.hidden}, {self.projection}, {self.temperature}")


@dataclass
class ModelConfig:
    name: str = "msrec"
    # the network: msrec = MultiScenarioModel, whose blocks below make msrec and its baselines
    # (shared_bottom, mmoe, ple, star); m3oe and pepnet are their own networks over the same
    # FieldEmbedding and towers (their blocks: .m3oe, .pepnet)
    arch: Literal["msrec", "m3oe", "pepnet", "sass"] = "msrec"
    kernels: Kernel = "auto"
    scenario_field: bool = True  # feed the scenario id as one more embedded field
    # the first linear layer over the field stack folds the dense and scenario fields into its
    # weight (msrec_dist/model/fields.py): same function, fewer FLOPs; off = build the stack
    fold_fields: bool = True
    # dropout on the trunk's output [B, H] and on the towers' input [T, B, h] (0: none)
    dropout: float = 0.0
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    star: StarConfig = field(default_factory=StarConfig)
    bottom: BottomConfig = field(default_factory=BottomConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    tower: TowerConfig = field(default_factory=TowerConfig)
    m3oe: M3oEConfig = field(default_factory=M3oEConfig)
    pepnet: PEPNetConfig = field(default_factory=PEPNetConfig)
    sass: SASSConfig = field(default_factory=SASSConfig)
