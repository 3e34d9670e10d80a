"""The model zoo (msrec_dist/model/zoo.py) for every config in configs/, on the hand-made 4-row
Batch: logits [B, T], a gradient on every parameter (EBC tables included), torchrec FX trace of
MultiTaskTrainModule equal to eager (train and eval), and the empty batch."""
from __future__ import annotations

import glob
import os

import pytest
import torch
from torchrec.fx import symbolic_trace
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msrec_dist.config import load_experiment
from msrec_dist.model.star import StarTrunk
from msrec_dist.model.zoo import MultiTaskTrainModule, build_model
from tests.model.conftest import B, SPARSE_KEYS, T, make_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in CONFIGS]


def _train_module(path: str, data, seed: int = 0) -> MultiTaskTrainModule:
    cfg = load_experiment(path, data="unused-data.yaml")
    torch.manual_seed(seed)
    return MultiTaskTrainModule(build_model(cfg.model, data), cfg.train.task_weights)


def test_every_model_config_is_tested():
    assert {"msrec", "msrec_full", "shared_bottom", "mmoe", "ple", "star", "m3oe", "pepnet", "sass"} <= set(NAMES)


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_forward_backward_reaches_every_parameter(path, model_data, batch4):
    module = _train_module(path, model_data)
    loss, (loss_d, logits, labels) = module(batch4)
    assert logits.shape == (B, T)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert not loss_d.requires_grad and not logits.requires_grad
    torch.testing.assert_close(labels, batch4.labels, rtol=0, atol=0)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch4.labels, reduction="sum") / B
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    params = dict(module.named_parameters())
    assert "model.embedding.ebc.embedding_bags.item.weight" in params
    assert "model.embedding.ebc.embedding_bags.user.weight" in params
    no_grad = [n for n, p in params.items() if p.grad is None]
    zero_grad = [n for n, p in params.items() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert not zero_grad, f"parameters with an all-zero gradient: {zero_grad}"


def test_config_blocks_are_switched(model_data):
    """Each config builds the blocks it names (so the other tests cover what they claim)."""
    built = {name: _train_module(path, model_data).model for name, path in zip(NAMES, CONFIGS)}
    chosen = built["msrec"]  # the blocks chosen on val: STAR with the aux net over all fields
    assert isinstance(chosen.trunk, StarTrunk) and chosen.aux is not None and chosen.aux.concat
    assert chosen.attention is None and chosen.experts is None and chosen.mixing is None
    msrec = built["msrec_full"]
    assert msrec.attention is not None and isinstance(msrec.trunk, StarTrunk)
    assert msrec.aux is not None and msrec.experts is not None and msrec.mixing is not None
    assert len(msrec.experts.levels) == 2
    assert built["shared_bottom"].experts is None and not isinstance(built["shared_bottom"].trunk, StarTrunk)
    mmoe = built["mmoe"].experts
    assert len(mmoe.levels) == 1 and (mmoe.levels[0].mask == 0).all()
    assert built["star"].experts is None and isinstance(built["star"].trunk, StarTrunk)
    assert len(built["ple"].experts.levels) == 2 and built["ple"].mixing is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_fx_traced_train_module_matches_eager(path, training, model_data, batch4):
    module = _train_module(path, model_data).train(training)
    traced = symbolic_trace(module)  # bakes in the train/eval branch of PartitionedNorm
    loss, (_, logits, _) = module(batch4)
    t_loss, (_, t_logits, t_labels) = traced(batch4)
    torch.testing.assert_close(t_logits, logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t_labels, batch4.labels, rtol=0, atol=0)
    if training:  # the traced graph trains too, and leaves the running stats out of autograd
        t_loss.backward()
        assert all(p.grad is not None for p in module.parameters())
        assert not any(buf.requires_grad for buf in module.buffers())
    # a second, different batch through the same trace (nothing was specialised on values)
    other = make_batch(bags={"item_id": [[0], [1], [2], [3]], "user_id": [[4], [5], [6], [7]],
                             "hist_item_ids": [[], [1, 2, 3, 4], [9], []]}, scenario=[2, 2, 1, 0], seed=1)
    torch.testing.assert_close(traced(other)[1][1], module(other)[1][1], rtol=1e-6, atol=1e-6)


def _empty_batch_variable_stride(batch):
    """B = 0 batch whose KJT has an explicit per-key stride of 0 (torchrec's EBC splits it)."""
    batch.sparse = KeyedJaggedTensor(keys=list(SPARSE_KEYS), values=torch.zeros(0, dtype=torch.int64),
                                     lengths=torch.zeros(0, dtype=torch.int32),
                                     stride_per_key_per_rank=[[0]] * len(SPARSE_KEYS))
    return batch


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_empty_batch_gives_zero_loss(path, model_data, empty_batch):
    module = _train_module(path, model_data).train()
    stats = [b.clone() for b in module.buffers()]
    loss, (_, logits, labels) = module(_empty_batch_variable_stride(empty_batch))
    assert logits.shape == (0, T) and labels.shape == (0, T)
    assert loss.item() == 0.0
    loss.backward()  # an empty rank still joins the backward (DDP needs every rank's grads)
    assert all(p.grad is None or not p.grad.abs().sum() > 0 for p in module.parameters())
    for before, after in zip(stats, module.buffers()):  # no scenario present: running stats kept
        torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.xfail(raises=IndexError, strict=True,
                   reason="torchrec 1.8 unsharded EmbeddingBagCollection: KeyedJaggedTensor.to_dict() "
                          "on a stride=0 KJT with empty lengths raises IndexError (the form "
                          "msrec_dist.training.loop.empty_batch builds); sharded EBCs take another path")
def test_empty_batch_stride0_through_unsharded_ebc(model_data, empty_batch):
    module = _train_module(CONFIGS[NAMES.index("shared_bottom")], model_data)
    loss, _ = module(empty_batch)
    assert loss.item() == 0.0


FOLDED = {"ple", "mmoe", "shared_bottom"}  # first layer linear over the field stack (no attention, no STAR)


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_fold_fields_gives_the_same_model(path, model_data, batch4):
    """model.fold_fields (dense and scenario fields folded into the first layer, model/fields.py)
    is on exactly where the first layer reads the field stack, and gives the logits and every
    parameter's gradient of the unfolded model (same seed, same parameters)."""
    name = os.path.splitext(os.path.basename(path))[0]
    module = _train_module(path, model_data)
    assert getattr(module.model, "fold_fields", False) == (name in FOLDED)  # m3oe, pepnet: no such switch
    unfolded = _train_module(path, model_data)
    if hasattr(unfolded.model, "fold_fields"):
        unfolded.model.fold_fields = False
    for m in (module, unfolded):
        loss, (_, logits, _) = m(batch4)
        loss.backward()
        m.logits = logits
    # float32: only the summation order differs (the exact identity is checked in float64 in test_fields.py)
    torch.testing.assert_close(module.logits, unfolded.logits, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(module.named_parameters(), unfolded.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_dropout_trains_noisy_and_evaluates_deterministic(model_data, batch4):
    """model.dropout: on in training (two forwards differ), off in eval (equal to the model without
    it, same weights)."""
    cfg = load_experiment(CONFIGS[NAMES.index("msrec_full")], data="unused-data.yaml", overrides=("model.dropout=0.5",))
    torch.manual_seed(0)
    module = MultiTaskTrainModule(build_model(cfg.model, model_data), [])
    plain_cfg = load_experiment(CONFIGS[NAMES.index("msrec_full")], data="unused-data.yaml")
    torch.manual_seed(0)
    plain = MultiTaskTrainModule(build_model(plain_cfg.model, model_data), [])
    module.train()
    assert not torch.equal(module(batch4)[1][1], module(batch4)[1][1])
    plain.load_state_dict(module.state_dict())  # the partitioned norm's running stats too
    module.eval()
    plain.eval()
    torch.testing.assert_close(module(batch4)[1][1], plain(batch4)[1][1], rtol=0, atol=0)


def test_per_scenario_towers_read_each_row_by_its_scenario(model_data):
    """model.tower.per_scenario: a batch of scenario-1 rows trains only scenario 1's towers, and
    the FX trace gives the eager logits."""
    cfg = load_experiment(CONFIGS[NAMES.index("msrec_full")], data="unused-data.yaml",
                          overrides=("model.tower.per_scenario=true",))
    torch.manual_seed(0)
    module = MultiTaskTrainModule(build_model(cfg.model, model_data), [])
    batch = make_batch(scenario=[1, 1, 1, 1], seed=2)
    loss, (_, logits, _) = module(batch)
    loss.backward()
    towers = module.model.towers
    assert towers.layers[0].weight.size(0) == 3 * T  # S * T towers, scenario-major
    for k in range(3 * T):
        touched = bool(towers.layers[0].weight.grad[k].abs().sum() > 0)
        assert touched == (k // T == 1), k
    traced = symbolic_trace(module)
    torch.testing.assert_close(traced(batch)[1][1], logits, rtol=1e-6, atol=1e-6)
