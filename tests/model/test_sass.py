"""SASS (msrec_dist/model/sass.py): the contrastive loss on hand-made views, the transfer gates
bounded and depending on the scenario, the network's shapes, the user views and the pre-training
module's loss and gradients on the hand-made batch of conftest.py."""
from __future__ import annotations

import math

import pytest
import torch

from msrec_dist.batch import Batch
from msrec_dist.model.config import AttentionConfig, ModelConfig, SASSConfig, TowerConfig
from msrec_dist.model.sass import SASS, SASSPretrainModule, TransferLayer, info_nce
from msrec_dist.model.star import scenario_onehot
from msrec_dist.model.zoo import build_model
from msrec_dist.typed_yaml import ConfigError, from_dict
from tests.model.conftest import B, S, T, make_kjt


def make_model(data, seed: int = 0, **sass) -> tuple[SASS, SASSPretrainModule]:
    cfg = ModelConfig(arch="sass", attention=AttentionConfig(heads=2, head_dim=3),
                      sass=SASSConfig(hidden=[8, 6], projection=[5], temperature=0.2, **sass), tower=TowerConfig([4]))
    torch.manual_seed(seed)
    model = build_model(cfg, data)
    return model, SASSPretrainModule(model, cfg.sass)


def test_info_nce_on_hand_made_views():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    eye = torch.eye(3, dtype=torch.bool)
    tau = 0.5
    logits = a @ b.t() / tau
    want = torch.stack([-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(3)]).mean()
    torch.testing.assert_close(info_nce(a, b, eye, tau), want)
    # rows 1 and 2 the same user: row 2's positives are b1 and b2 (both (0, 1))
    same = eye.clone()
    same[1, 2] = same[2, 1] = True
    row2 = -(torch.logsumexp(logits[2, 1:], 0) - torch.logsumexp(logits[2], 0))
    row1 = -(torch.logsumexp(logits[1, 1:], 0) - torch.logsumexp(logits[1], 0))
    row0 = -(logits[0, 0] - torch.logsumexp(logits[0], 0))
    torch.testing.assert_close(info_nce(a, b, same, tau), (row0 + row1 + row2) / 3)
    # aligned views of distinct users: the loss falls as τ falls, to 0
    assert info_nce(b[:2], b[:2], torch.eye(2, dtype=torch.bool), 0.01) < 1e-6
    assert math.isclose(info_nce(torch.eye(2), torch.eye(2).flip(0), torch.eye(2, dtype=torch.bool), 1.0).item(),
                        math.log(1 + math.e), rel_tol=1e-6)


def test_gates_are_bounded_and_depend_on_the_scenario():
    torch.manual_seed(0)
    layer = TransferLayer(6, 5, S)
    with torch.no_grad():  # scenario weights away from STAR's init of 1
        for lin in (layer.scenario, layer.adaptive_gate, layer.update_gate):
            lin.scenario_weight.normal_(1.0, 0.5)
            lin.scenario_bias.normal_()
    x = torch.randn(1, 6).expand(S, 6) * 10  # the same row in every scenario, large values
    onehot = scenario_onehot(torch.arange(S), S, torch.float32)
    _, _, adaptive, update = layer.gates(x, x, onehot)
    for gate in (adaptive, update):
        assert gate.shape == (S, 5) and ((gate >= 0) & (gate <= 1)).all()
        assert (gate[0] - gate[1]).abs().max() > 1e-3 and (gate[1] - gate[2]).abs().max() > 1e-3
    s, g = layer(x, x, onehot)
    own = torch.relu(layer.scenario(x, onehot))
    torch.testing.assert_close(s, update * own + (1 - update) * adaptive * g)  # the update gate's mix


def test_network_shapes_and_user_views(model_data, batch4):
    model, pretrain = make_model(model_data, user_fields=["user_id"])
    logits = model(batch4)
    assert logits.shape == (B, T) and torch.isfinite(logits).all()
    scen, glob = pretrain.user_views(batch4)
    assert scen.shape == glob.shape == (B, 5)
    torch.testing.assert_close(scen.norm(dim=1), torch.ones(B))
    assert not torch.allclose(scen, glob)  # the views differ by the scenario field
    assert pretrain.user_ids(batch4).tolist() == [10, 11, 12, 13]


def test_pretrain_loss_learns_to_match_a_users_views(model_data, batch4):
    """Rows 0 and 2 share user 10 (in scenarios 0 and 2): the loss counts both as positives, and a
    few steps lower it; only the encoder (tables, attention, head) gets gradients."""
    bags = {"item_id": [[3], [7], [1], [9]], "user_id": [[10], [11], [10], [13]],
            "hist_item_ids": [[2, 5], [], [4, 6, 8], [5]]}
    batch = Batch(sparse=make_kjt(bags), dense=batch4.dense, labels=batch4.labels, scenario=batch4.scenario,
                  rows=batch4.rows)
    model, module = make_model(model_data, user_fields=["user_id", "hist_item_ids"])
    assert module.user_ids(batch).tolist() == [10, 11, 10, 13]
    loss, (logged, logits, labels) = module(batch)
    assert logits.shape == (B, T) and float(logged) == float(loss.detach())
    loss.backward()
    assert model.embedding.ebc.embedding_bags["user"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.trunk.parameters())  # the transfer layers play no part
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.05)
    first = float(loss)
    for _ in range(30):
        opt.zero_grad()
        loss, _ = module(batch)
        loss.backward()
        opt.step()
    assert float(loss) < first * 0.7


def test_view_drop_hides_the_user_id_from_the_scenario_view_only(model_data, batch4):
    """model.sass.view_drop: the scenario view no longer depends on the user id's embedding, the
    global view still does."""
    model, module = make_model(model_data, user_fields=["user_id", "hist_item_ids"], view_drop=["user_id"])
    scen, glob = module.user_views(batch4)
    with torch.no_grad():
        model.embedding.ebc.embedding_bags["user"].weight.normal_()
    scen2, glob2 = module.user_views(batch4)
    torch.testing.assert_close(scen2, scen)
    assert (glob2 - glob).abs().max() > 1e-3
    with pytest.raises(ValueError, match="view_drop"):
        make_model(model_data, view_drop=["nope"])


def test_config_errors(model_data):
    with pytest.raises(ValueError, match="user_fields / user_id_feature"):
        make_model(model_data, user_fields=["nope"])
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        make_model(model_data, user_id_feature="nope")
    with pytest.raises(ConfigError, match="temperature"):
        from_dict(ModelConfig, {"arch": "sass", "sass": {"temperature": 0}}, "m")
    with pytest.raises(ValueError, match="model.arch sass or msrec"):
        SASSPretrainModule(torch.nn.Linear(2, 2), SASSConfig())
    with pytest.raises(ValueError, match="sass.block replaces the trunk"):
        build_model(ModelConfig(sass=SASSConfig(block=True)), model_data)


def test_transfer_layers_as_msrec_block(model_data, batch4):
    """model.sass.block: msrec's network with the transfer layers as its trunk; stage 1 pre-trains
    its tables and attention through the same module."""
    from msrec_dist.model.sass import TransferTrunk
    from msrec_dist.model.zoo import MultiScenarioModel

    cfg = ModelConfig(attention=AttentionConfig(heads=2, head_dim=3), sass=SASSConfig(block=True, hidden=[8, 6]),
                      tower=TowerConfig([4]))
    cfg.star.enabled = False
    cfg.experts.kind = "none"
    cfg.mixing.enabled = False
    torch.manual_seed(0)
    model = build_model(cfg, model_data)
    assert isinstance(model, MultiScenarioModel) and isinstance(model.trunk, TransferTrunk)
    assert model(batch4).shape == (B, T)
    loss, _ = SASSPretrainModule(model, SASSConfig(user_fields=["user_id"], projection=[5]))(batch4)
    loss.backward()
    assert torch.isfinite(loss) and model.attention[0].qkv.weight.grad.abs().sum() > 0
