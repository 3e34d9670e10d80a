"""PEPNet (msrec_dist/model/pepnet.py) on the hand-made batch of conftest.py: shapes, the gates'
range, the stop-gradients, the reduction to plain embedding + towers when every gate is 1, the
config switches (FX trace, empty batch) and a short training run that learns."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torchrec.fx import symbolic_trace
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msrec_dist.batch import Batch
from msrec_dist.model.config import ModelConfig, PEPNetConfig, TowerConfig
from msrec_dist.model.pepnet import PEPNet
from msrec_dist.model.zoo import MultiTaskTrainModule, build_model
from msrec_dist.typed_yaml import ConfigError, from_dict
from tests.model.conftest import B, S, SPARSE_KEYS, T, make_kjt

HIDDEN = [8, 6]


def make_model(data, seed: int = 0, hidden=None, **pepnet) -> PEPNet:
    cfg = ModelConfig(arch="pepnet", pepnet=PEPNetConfig(**pepnet),
                      tower=TowerConfig(list(HIDDEN if hidden is None else hidden)))
    torch.manual_seed(seed)
    return build_model(cfg, data)


def fields_of(model: PEPNet, batch: Batch) -> torch.Tensor:
    """The embedded fields [B, F, D] as a leaf, so gradients can be asked of them."""
    return model.embedding(batch.sparse, batch.dense, batch.scenario).detach().requires_grad_()


def test_shapes(model_data, batch4):
    model = make_model(model_data)
    assert isinstance(model, PEPNet) and model.num_tasks == T and model.num_scenarios == S
    fields = fields_of(model, batch4)
    num_fields, dim = model.embedding.num_fields, model.embedding.dim
    assert fields.shape == (B, num_fields, dim)
    assert model.domain_gate(fields, batch4.scenario).shape == (B, num_fields)
    o_ep = model.embed(fields, batch4.scenario)
    assert o_ep.shape == (B, num_fields * dim)
    assert [tuple(g.shape) for g in model.personal_gates(fields, o_ep)] == [(T, B, w) for w in HIDDEN]
    assert model(batch4).shape == (B, T)
    element = make_model(model_data, epnet_gate="element")
    assert element.domain_gate(fields, batch4.scenario).shape == (B, num_fields * dim)


def _all_gates(model: PEPNet, batch: Batch) -> list[torch.Tensor]:
    fields = fields_of(model, batch)
    o_ep = model.embed(fields, batch.scenario)
    return [model.domain_gate(fields, batch.scenario)] + model.personal_gates(fields, o_ep)


@pytest.mark.parametrize("gamma", [2.0, 3.0])
def test_gates_lie_in_zero_gamma_and_reach_both_sides_of_one(model_data, batch4, gamma):
    model = make_model(model_data, gamma=gamma)
    for g in _all_gates(model, batch4):
        assert (g > 0).all() and (g < gamma).all()
    gate_nets = [model.epnet, *model.ppnet]
    with torch.no_grad():  # push every gate logit up, then down: the gates follow, staying inside
        for shift, side in ((4.0, lambda g: g > gamma / 2), (-4.0, lambda g: g < gamma / 2)):
            for net in gate_nets:
                net.out.bias += shift
            for g in _all_gates(model, batch4):
                assert (g > 0).all() and (g < gamma).all() and side(g).all()
            for net in gate_nets:
                net.out.bias -= shift


def _grad(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d out.sum() / d x, zeros where x does not reach out."""
    (g,) = torch.autograd.grad(out.sum(), x, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _reached(grad: torch.Tensor) -> list[bool]:
    """Per field of a [B, F, D] gradient: does any gradient reach it."""
    return (grad.abs().sum(dim=(0, 2)) > 0).tolist()


def test_stop_gradients(model_data, batch4):
    """The general embedding (and O_ep) are gate inputs without gradient: a gate's gradient
    reaches only its own prior fields (domain / personal features), while the loss still
    reaches every field through the scaled path O_ep."""
    model = make_model(model_data, domain_features=["item_id"], personal_features=["user_id"])
    names = list(model.embedding.field_names)
    fields = fields_of(model, batch4)
    num_fields = fields.size(1)
    only = [[i == names.index(n) for i in range(num_fields)] for n in ("item_id", "user_id")]

    delta = model.domain_gate(fields, batch4.scenario)
    assert _reached(_grad(delta, fields)) == only[0]  # the domain feature only, not sg(E)

    o_ep = model.embed(fields, batch4.scenario)
    gates = torch.cat([g.flatten() for g in model.personal_gates(fields, o_ep)])
    assert (_grad(gates, o_ep) == 0).all()  # sg(O_ep)
    assert _reached(_grad(gates, fields)) == only[1]  # the personal feature only, nothing via O_ep

    logits = model.towers(o_ep, model.personal_gates(fields, o_ep))
    assert all(_reached(_grad(logits, fields)))  # the loss reaches every field
    # and the gate networks learn from it
    params = list(model.epnet.parameters()) + list(model.ppnet.parameters())
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(logits.sum(), params))


def test_stop_gradient_with_no_domain_features(model_data, batch4):
    """Without domain features the EPNet gate reads the scenario and sg(E): no gradient at all
    flows from it into the fields."""
    model = make_model(model_data)
    fields = fields_of(model, batch4)
    (g,) = torch.autograd.grad(model.domain_gate(fields, batch4.scenario).sum(), fields, allow_unused=True)
    assert g is None


def test_unit_gates_reduce_to_plain_embedding_and_towers(model_data, batch4):
    model = make_model(model_data)
    with torch.no_grad():  # gamma * sigmoid(0) = 1 for every gate
        for net in [model.epnet, *model.ppnet]:
            net.out.weight.zero_()
            net.out.bias.zero_()
    for g in _all_gates(model, batch4):
        torch.testing.assert_close(g, torch.ones_like(g), rtol=0, atol=0)
    plain = make_model(model_data, seed=1, epnet=False, ppnet=False)
    assert plain.epnet is None and plain.ppnet is None
    result = plain.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys  # every plain parameter comes from the gated model
    assert result.unexpected_keys and all(k.startswith(("epnet.", "ppnet.")) for k in result.unexpected_keys)
    torch.testing.assert_close(model(batch4), plain(batch4), rtol=0, atol=0)
    # and the plain model is embedding → flatten → one ReLU MLP per task → logit
    x = plain.embedding(batch4.sparse, batch4.dense, batch4.scenario).flatten(1)
    for t in range(T):
        h = x
        for layer in plain.tower_layers:
            h = torch.relu(h @ layer.weight[t] + layer.bias[t])
        expected = h @ plain.logit.weight[t] + plain.logit.bias[t]
        torch.testing.assert_close(plain(batch4)[:, t], expected.squeeze(1))


def test_domain_gate_follows_the_scenario(model_data, batch4):
    model = make_model(model_data)
    other = list(batch4.scenario.tolist())
    other[1] = (other[1] + 1) % S
    fields = fields_of(model, batch4)
    a = model.domain_gate(fields, batch4.scenario)
    b = model.domain_gate(fields, torch.tensor(other))
    changed = a.ne(b).any(dim=1).tolist()
    assert changed == [i == 1 for i in range(B)]


VARIANTS = {
    "default": {},
    "no_epnet": {"epnet": False},
    "no_ppnet": {"ppnet": False},
    "neither_no_hidden": {"epnet": False, "ppnet": False, "hidden": []},
    "element_domain_personal": {"epnet_gate": "element", "domain_features": ["item_id"],
                                "personal_features": ["user_id", "hist_item_ids"]},
}


def _empty_batch_variable_stride() -> Batch:
    """B = 0 with a per-key stride of 0 (the form torchrec's unsharded EBC accepts)."""
    return Batch(sparse=KeyedJaggedTensor(keys=list(SPARSE_KEYS), values=torch.zeros(0, dtype=torch.int64),
                                          lengths=torch.zeros(0, dtype=torch.int32),
                                          stride_per_key_per_rank=[[0]] * len(SPARSE_KEYS)),
                 dense=torch.zeros(0, 2), labels=torch.zeros(0, T), scenario=torch.zeros(0, dtype=torch.int64),
                 rows=torch.zeros(0, dtype=torch.int64))


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_variants_trace_train_and_take_an_empty_batch(model_data, batch4, variant):
    module = MultiTaskTrainModule(make_model(model_data, **VARIANTS[variant]), [])
    traced = symbolic_trace(module)
    loss, (_, logits, _) = module(batch4)
    t_loss, (_, t_logits, _) = traced(batch4)
    assert logits.shape == (B, T)
    torch.testing.assert_close(t_logits, logits, rtol=1e-6, atol=1e-6)
    t_loss.backward()
    no_grad = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    module.zero_grad(set_to_none=True)
    loss, (_, logits, _) = module(_empty_batch_variable_stride())
    assert logits.shape == (0, T) and loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.abs().sum() > 0 for p in module.parameters())


def test_bad_configs_are_refused(model_data):
    with pytest.raises(ValueError, match="personal_features"):
        make_model(model_data, personal_features=["no_such_feature"])
    with pytest.raises(ValueError, match="domain_features"):
        make_model(model_data, domain_features=["price"])  # dense: not a sparse field
    with pytest.raises(ValueError, match="tower.hidden"):
        make_model(model_data, hidden=[])
    for bad in ({"gamma": 0.0}, {"gate_hidden": 0}):
        with pytest.raises(ConfigError):
            from_dict(PEPNetConfig, {**dataclasses.asdict(PEPNetConfig()), **bad}, "model.pepnet")


def _learnable_batch(n: int, seed: int) -> Batch:
    """n rows whose labels are a function of (user, scenario) and of the item: learnable."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, 16, (n,), generator=g)
    items = torch.randint(0, 20, (n,), generator=g)
    scenario = torch.randint(0, S, (n,), generator=g)
    bags = {"item_id": [[int(i)] for i in items], "user_id": [[int(u)] for u in users],
            "hist_item_ids": [[int(i) for i in torch.randint(0, 20, (int(k),), generator=g)]
                              for k in torch.randint(0, 4, (n,), generator=g)]}
    click = ((users + scenario) % 2).float()
    convert = (items % 3 == 0).float()
    return Batch(sparse=make_kjt(bags), dense=torch.randn(n, 2, generator=g),
                 labels=torch.stack([click, convert], dim=1), scenario=scenario,
                 rows=torch.arange(n, dtype=torch.int64))


def test_a_short_training_run_learns(model_data):
    batch = _learnable_batch(64, seed=0)
    module = MultiTaskTrainModule(make_model(model_data), [])
    opt = torch.optim.Adam(module.parameters(), lr=0.01)
    losses = []
    for _ in range(150):
        loss, _ = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-10:]) / 10
    assert last < first / 4, f"loss {first:.4f} → {last:.4f}"

