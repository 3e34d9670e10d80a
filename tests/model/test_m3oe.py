"""M3oE (msrec_dist/model/m3oe.py) on the hand-made FeatureSpec and Batch of conftest.py: shapes,
the per-(domain, task) towers and domain experts learn from the rows the paper routes to them,
the two-level balance/fusion weights act as written (level 1: α own domain, (1 − α)/(S − 1) each
other; β the same over tasks; level 2: σ(w_d), σ(w_t)), and a short training run learns."""
from __future__ import annotations

import os

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msrec_dist.batch import Batch
from msrec_dist.config import load_experiment
from msrec_dist.model.config import M3oEConfig, ModelConfig, TowerConfig
from msrec_dist.model.m3oe import M3oE
from msrec_dist.model.star import scenario_onehot
from msrec_dist.model.zoo import MultiTaskTrainModule, build_model
from tests.model.conftest import SPARSE_KEYS, B, S, T, make_kjt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_cfg(**m3oe) -> ModelConfig:
    return ModelConfig(arch="m3oe", m3oe=M3oEConfig(**{"bottom": [16, 12], "expert_hidden": [8],
                                                        "shared_experts": 3, **m3oe}),
                       tower=TowerConfig(hidden=[6]))


def build(model_data, seed: int = 0, **m3oe) -> M3oE:
    torch.manual_seed(seed)
    return M3oE(small_cfg(**m3oe), model_data)


def expert_inputs(model: M3oE, batch: Batch, seed: int = 0):
    """Random expert outputs (leaves) of the model's shapes, to read fuse() as a function of them."""
    g = torch.Generator().manual_seed(seed)
    n, h, hid = batch.scenario.size(0), model.experts.out_dim, model.gates.in_features
    shared, domain, task = (torch.rand(k, n, h, generator=g).requires_grad_()
                            for k in (model.num_shared, model.num_scenarios, model.num_tasks))
    return torch.randn(n, hid, generator=g), shared, domain, task


def test_shapes(model_data, batch4, empty_batch):
    model = build(model_data)
    cfg = small_cfg().m3oe
    e = cfg.shared_experts
    assert build_model(small_cfg(), model_data).__class__ is M3oE  # zoo dispatches on arch
    assert model.experts(torch.zeros(B, model.gates.in_features)).shape == (e + S + T, B, cfg.expert_hidden[-1])
    assert model.gates.out_features == S * T * e
    assert model.tower_out.weight.shape[0] == S * T
    assert model(batch4).shape == (B, T)
    h, shared, domain, task = expert_inputs(model, batch4)
    onehot = scenario_onehot(batch4.scenario, S, h.dtype)
    assert model.fuse(h, shared, domain, task, batch4.scenario, onehot).shape == (T, B, cfg.expert_hidden[-1])
    # B = 0 as the sharded path gives it (an unsharded EBC fails on the stride-0 KJT: test_zoo.py)
    empty_batch.sparse = KeyedJaggedTensor(keys=list(SPARSE_KEYS), values=torch.zeros(0, dtype=torch.int64),
                                           lengths=torch.zeros(0, dtype=torch.int32),
                                           stride_per_key_per_rank=[[0]] * len(SPARSE_KEYS))
    loss, (_, logits, _) = MultiTaskTrainModule(model, [])(empty_batch)
    assert logits.shape == (0, T) and loss.item() == 0.0
    no_bottom = build(model_data, bottom=[])  # experts straight on the flattened fields
    assert no_bottom.bottom is None and no_bottom(batch4).shape == (B, T)


def test_yaml_config_builds_m3oe(model_data, batch4):
    cfg = load_experiment(os.path.join(ROOT, "configs", "m3oe.yaml"), data="unused.yaml")
    assert cfg.model.arch == "m3oe" and isinstance(build_model(cfg.model, model_data), M3oE)


def _row_grads(model: M3oE, batch: Batch, domain: int) -> None:
    model.zero_grad()
    logits = model(batch)
    logits[batch.scenario == domain].sum().backward()


@pytest.mark.parametrize("domain", range(S))
def test_towers_gates_and_star_weights_of_a_domain_learn_only_from_its_rows(model_data, batch4, domain):
    model = build(model_data)
    _row_grads(model, batch4, domain)
    e = model.num_shared
    tower_grad = model.towers.linears[0].weight.grad.abs().flatten(1).sum(1)  # [S·T], tower d·T + t
    out_grad = model.tower_out.weight.grad.abs().flatten(1).sum(1)
    gate_grad = model.gates.weight.grad.view(S, T * e, -1).abs().flatten(1).sum(1)  # [S]
    star_grad = model.bottom.star.scenario_weight.grad.abs().flatten(1).sum(1)  # [S]
    for k in range(S * T):
        own = k // T == domain
        assert (tower_grad[k] > 0) == own and (out_grad[k] > 0) == own, k
    for d in range(S):
        assert (gate_grad[d] > 0) == (d == domain) and (star_grad[d] > 0) == (d == domain), d


@pytest.mark.parametrize("domain", range(S))
def test_domain_experts_are_isolated_when_alpha_is_one(model_data, batch4, domain):
    """α = 1: a domain expert learns only from its domain's rows; α < 1: every domain expert
    gets a share of every row (the (1 − α)/(S − 1) of level 1)."""
    e, first = small_cfg().m3oe.shared_experts, lambda m: m.experts.linears[0].weight.grad
    isolated = build(model_data, domain_balance_init=50.0)  # σ(50) is 1 in float32
    assert torch.sigmoid(isolated.domain_balance).item() == 1.0
    _row_grads(isolated, batch4, domain)
    for j in range(S):
        assert (first(isolated)[e + j].abs().sum() > 0) == (j == domain), j
    shared = build(model_data)
    _row_grads(shared, batch4, domain)
    assert all(first(shared)[e + j].abs().sum() > 0 for j in range(S))


@pytest.mark.parametrize("balance,fusion", [(1.0, 1.0), (-0.7, 0.4), (2.5, -1.5)])
def test_fusion_is_the_two_level_balance_of_the_paper(model_data, batch4, balance, fusion):
    """d fused[t, b] / d expert output, against the formulas written out here: a row of domain d
    takes σ(w_d)·α of domain expert d and σ(w_d)·(1 − α)/(S − 1) of each other; task t takes
    σ(w_t)·β of task expert t and σ(w_t)·(1 − β)/(T − 1) of each other; nothing across rows."""
    model = build(model_data, domain_balance_init=balance, task_balance_init=-balance,
                  domain_fusion_init=fusion, task_fusion_init=2 * fusion)
    h, shared, domain, task = expert_inputs(model, batch4)
    onehot = scenario_onehot(batch4.scenario, S, h.dtype)
    fused = model.fuse(h, shared, domain, task, batch4.scenario, onehot)  # [T, B, h']
    g = torch.Generator().manual_seed(1)
    v = torch.randn(fused.shape, generator=g)
    (fused * v).sum().backward()
    alpha, beta = torch.sigmoid(torch.tensor(balance)), torch.sigmoid(torch.tensor(-balance))
    w_d, w_t = torch.sigmoid(torch.tensor(fusion)), torch.sigmoid(torch.tensor(2 * fusion))
    for j in range(S):
        for b in range(B):
            share = alpha if j == batch4.scenario[b] else (1 - alpha) / (S - 1)
            torch.testing.assert_close(domain.grad[j, b], w_d * share * v[:, b].sum(0))
    for u in range(T):
        for b in range(B):
            expected = sum((beta if u == t else (1 - beta) / (T - 1)) * v[t, b] for t in range(T))
            torch.testing.assert_close(task.grad[u, b], w_t * expected)
    balance_d, balance_t = model.balance_matrices()  # rows are convex weights
    torch.testing.assert_close(balance_d.sum(1), torch.ones(S))
    torch.testing.assert_close(balance_t.sum(1), torch.ones(T))


def test_shared_gates_are_softmax_weights_of_the_row_domain(model_data, batch4):
    """With equal domain and task outputs zeroed, fused = Σ_e softmax(gate (d, t))_e · shared_e."""
    model = build(model_data)
    h, shared, domain, task = expert_inputs(model, batch4)
    onehot = scenario_onehot(batch4.scenario, S, h.dtype)
    fused = model.fuse(h, shared, torch.zeros_like(domain), torch.zeros_like(task), batch4.scenario, onehot)
    e = model.num_shared
    logits = model.gates(h).view(B, S, T, e)
    for b in range(B):
        weights = torch.softmax(logits[b, batch4.scenario[b]], dim=-1)  # [T, E]
        torch.testing.assert_close(fused[:, b], weights @ shared[:, b])


@pytest.mark.parametrize("detach", [True, False])
def test_detach_gates(model_data, batch4, detach):
    model = build(model_data, detach_gates=detach)
    h, shared, domain, task = expert_inputs(model, batch4)
    h.requires_grad_()
    onehot = scenario_onehot(batch4.scenario, S, h.dtype)
    model.fuse(h, shared, domain, task, batch4.scenario, onehot).square().sum().backward()
    assert (h.grad is not None and h.grad.abs().sum() > 0) == (not detach)
    assert model.gates.weight.grad.abs().sum() > 0


def planted_batch(n: int, seed: int) -> Batch:
    """n rows whose labels depend on the scenario and the item id: learnable, not linearly in one."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, 20, (n,), generator=g)
    users = torch.randint(0, 16, (n,), generator=g)
    scenario = torch.randint(0, S, (n,), generator=g)
    bags = {"item_id": [[int(i)] for i in items], "user_id": [[int(u)] for u in users],
            "hist_item_ids": [[int(i) for i in torch.randint(0, 20, (int(k),), generator=g)]
                              for k in torch.randint(0, 4, (n,), generator=g)]}
    click = ((items % 2) ^ (scenario == S - 1).long()).float()  # the last domain flips the item effect
    convert = click * (users % 3 == 0).float()
    return Batch(sparse=make_kjt(bags), dense=torch.randn(n, 2, generator=g),
                 labels=torch.stack([click, convert], 1), scenario=scenario, rows=torch.arange(n))


def test_training_learns(model_data):
    module = MultiTaskTrainModule(build(model_data), [])
    batch = planted_batch(96, seed=0)
    start = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.dim() == 0}
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss, _ = module(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    # the four level-1/level-2 weights are learned with the model
    assert set(start) == {"domain_balance", "task_balance", "domain_fusion", "task_fusion"}
    for name, before in start.items():
        assert not torch.equal(dict(module.model.named_parameters())[name].detach(), before), name
