"""OOV dropout (msrec_dist/training/oov_dropout.py): in training, ids of the features with an
oov_id are replaced by it at the configured rate; other features, lengths and the rest of the
batch stay as they are; the draws follow torch's seeded RNG."""
import dataclasses

import pytest
import torch

from msrec_dist.training.oov_dropout import OOVDropout
from tests.model.conftest import SPARSE_KEYS, make_batch, make_data_config


def _spec(oov: dict[str, int]):
    spec = make_data_config()
    spec.sparse = [dataclasses.replace(f, oov_id=oov.get(f.name)) for f in spec.sparse]
    return spec


def _bags(batch) -> dict[str, list[int]]:
    return {k: batch.sparse[k].values().tolist() for k in SPARSE_KEYS}


def test_rate_one_replaces_every_id_of_the_chosen_features_only():
    batch = make_batch(seed=0)
    out = OOVDropout(_spec({"user_id": 0, "item_id": 3}), 1.0, [])(batch)
    before, after = _bags(batch), _bags(out)
    assert after["user_id"] == [0] * len(before["user_id"])
    assert after["item_id"] == [3] * len(before["item_id"])
    assert after["hist_item_ids"] == before["hist_item_ids"]  # no oov_id: untouched
    assert torch.equal(out.sparse.lengths(), batch.sparse.lengths())
    assert out.dense is batch.dense and out.labels is batch.labels and out.scenario is batch.scenario
    only_user = OOVDropout(_spec({"user_id": 0, "item_id": 3}), 1.0, ["user_id"])(batch)
    assert _bags(only_user)["item_id"] == before["item_id"]


def test_rate_is_respected_and_seeded():
    spec = _spec({"hist_item_ids": 0})
    many = make_batch(bags={"item_id": [[1]] * 4, "user_id": [[2]] * 4, "hist_item_ids": [list(range(1, 20))] * 4})
    drop = OOVDropout(spec, 0.3, [])
    torch.manual_seed(5)
    draws = [sum(v == 0 for v in _bags(drop(many))["hist_item_ids"]) for _ in range(200)]
    share = sum(draws) / (200 * 4 * 19)
    assert 0.27 < share < 0.33
    torch.manual_seed(5)
    assert [sum(v == 0 for v in _bags(drop(many))["hist_item_ids"]) for _ in range(200)] == draws


def test_zero_rate_or_no_oov_feature_is_the_identity():
    batch = make_batch(seed=1)
    assert OOVDropout(_spec({"user_id": 0}), 0.0, [])(batch) is batch
    assert OOVDropout(_spec({}), 0.5, [])(batch) is batch


def test_unknown_feature_is_refused():
    with pytest.raises(ValueError, match="oov_id"):
        OOVDropout(_spec({"user_id": 0}), 0.1, ["item_id"])
