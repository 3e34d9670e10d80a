"""Field embedding (msrec_dist/model/embedding.py) on the hand-made 4-row Batch (conftest.py):
field order and shape [B, F, D], sum/mean pooling (empty bag → zeros), dense and scenario
fields, scale_grad, eager vs FX-traced (torchrec's tracer)."""
from __future__ import annotations

import pytest
import torch
from torchrec.fx import symbolic_trace

from msrec_dist.model.embedding import FieldEmbedding, scale_grad
from tests.model.conftest import BAGS, D

# Fields follow the KJT key order (features grouped by table), whatever order the (sharded) EBC outputs
FIELD_ORDER = ["item_id", "hist_item_ids", "user_id"]


def _embedding(data, **kw) -> FieldEmbedding:
    torch.manual_seed(0)
    return FieldEmbedding(data, scenario_field=True, **kw)


def _fields(emb: FieldEmbedding, batch) -> torch.Tensor:
    return emb(batch.sparse, batch.dense, batch.scenario)


def test_field_count_order_and_shape(model_data, batch4):
    emb = _embedding(model_data)
    assert emb.field_names == FIELD_ORDER
    assert list(emb.ebc.embedding_bags.keys()) == ["item", "user"]  # item_id and hist share `item`
    assert emb.num_fields == 3 + 2 + 1  # sparse + dense + scenario
    assert _fields(emb, batch4).shape == (4, 6, D)
    no_scen = FieldEmbedding(model_data, scenario_field=False)
    assert no_scen.num_fields == 5
    assert no_scen(batch4.sparse, batch4.dense, batch4.scenario).shape == (4, 5, D)


def test_sum_and_mean_pooling_empty_bag_is_zero(model_data, batch4):
    emb = _embedding(model_data)
    fields = _fields(emb, batch4)
    item_w = emb.ebc.embedding_bags["item"].weight
    user_w = emb.ebc.embedding_bags["user"].weight
    item, user, hist_f = (FIELD_ORDER.index(f) for f in ("item_id", "user_id", "hist_item_ids"))
    for b in range(4):
        torch.testing.assert_close(fields[b, item], item_w[BAGS["item_id"][b]].sum(0))
        torch.testing.assert_close(fields[b, user], user_w[BAGS["user_id"][b]].sum(0))
        hist = BAGS["hist_item_ids"][b]
        if hist:  # mean = sum / length
            torch.testing.assert_close(fields[b, hist_f], item_w[hist].sum(0) / len(hist))
        else:
            torch.testing.assert_close(fields[b, hist_f], torch.zeros(D), rtol=0, atol=0)
    assert BAGS["hist_item_ids"][1] == [] and BAGS["hist_item_ids"][2] == [4, 6, 8]


def test_dense_and_scenario_fields(model_data, batch4):
    emb = _embedding(model_data)
    with torch.no_grad():
        emb.dense_bias.normal_()
    fields = _fields(emb, batch4)
    for n in range(2):
        expected = batch4.dense[:, n : n + 1] * emb.dense_weight[n] + emb.dense_bias[n]  # [B, D]
        torch.testing.assert_close(fields[:, 3 + n], expected)
    torch.testing.assert_close(fields[:, 5], emb.scenario_emb.weight[batch4.scenario])


def test_scale_grad_identity_forward_scaled_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    upstream = torch.randn(3, 4)
    y = scale_grad(x, 0.25)
    torch.testing.assert_close(y, x.detach(), rtol=0, atol=0)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, 0.25 * upstream)
    assert scale_grad(x, 1.0) is x


def test_grad_scale_scales_only_embedding_table_gradients(model_data, batch4):
    grads = {}
    for scale in (1.0, 0.5):
        emb = _embedding(model_data, grad_scale=scale)
        fields = _fields(emb, batch4)
        fields.pow(2).sum().backward()
        grads[scale] = ({n: p.grad.clone() for n, p in emb.named_parameters()}, fields.detach())
    (g1, f1), (g2, f2) = grads[1.0], grads[0.5]
    torch.testing.assert_close(f2, f1, rtol=0, atol=0)
    for name in g1:
        if name.startswith("ebc."):
            assert g1[name].abs().sum() > 0
            torch.testing.assert_close(g2[name], 0.5 * g1[name])
        else:  # dense and scenario fields are not scaled
            torch.testing.assert_close(g2[name], g1[name])


def test_replicated_tables_keep_their_gradient_unscaled(model_data, batch4):
    """set_grad_scales(0.5, {"user"}): the user table's gradient is the unscaled one (DDP
    averages it), the model-parallel item table's is halved; forward unchanged."""
    grads = {}
    for scale, replicated in ((1.0, set()), (0.5, {"user"})):
        emb = _embedding(model_data)
        emb.set_grad_scales(scale, replicated)
        fields = _fields(emb, batch4)
        fields.pow(2).sum().backward()
        grads[scale] = ({n: p.grad.clone() for n, p in emb.named_parameters()}, fields.detach())
    (g1, f1), (g2, f2) = grads[1.0], grads[0.5]
    torch.testing.assert_close(f2, f1, rtol=0, atol=0)
    assert g1["ebc.embedding_bags.user.weight"].abs().sum() > 0
    torch.testing.assert_close(g2["ebc.embedding_bags.user.weight"], g1["ebc.embedding_bags.user.weight"])
    torch.testing.assert_close(g2["ebc.embedding_bags.item.weight"], 0.5 * g1["ebc.embedding_bags.item.weight"])
    emb = _embedding(model_data)
    emb.set_grad_scales(0.5, {"user", "item"})
    assert emb.grad_scale_value == 1.0  # every field replicated: the float fast path


def test_eager_and_fx_traced(model_data, batch4):
    emb = _embedding(model_data)
    traced = symbolic_trace(emb)
    torch.testing.assert_close(traced(batch4.sparse, batch4.dense, batch4.scenario), _fields(emb, batch4),
                               rtol=0, atol=0)


def test_kjt_in_another_key_order_is_refused(model_data, batch4):
    """The mean divisor and the local lookup read the KJT in kjt_keys order: another order (e.g.
    the schema's) is an error that names both, not silently mixed-up fields."""
    emb = _embedding(model_data)
    schema_order = batch4.sparse.permute([FIELD_ORDER.index(k) for k in model_data.sparse_names])
    assert schema_order.keys() == model_data.sparse_names != FIELD_ORDER
    with pytest.raises(ValueError, match=r"not in the expected order .*item_id', 'hist_item_ids', 'user_id'"):
        emb(schema_order, batch4.dense, batch4.scenario)


def _with_vector(model_data):
    """model_data with a vector feature (dim 5) between the two scalars: fields sparse, vector, dense."""
    from msrec_dist.features import DenseFeature, FeatureSpec

    spec = FeatureSpec(model_data.scenario, model_data.tasks, model_data.sparse,
                       [model_data.dense[0], DenseFeature("text_emb", dim=5), model_data.dense[1]])
    spec.validate("")
    return spec


def _vector_dense(batch4) -> torch.Tensor:  # [B, 2 + 5]: the scalars' columns, then the vector's
    return torch.cat([batch4.dense, torch.randn(4, 5, generator=torch.Generator().manual_seed(3))], dim=1)


def test_vector_feature_is_one_projected_field_and_scalars_are_unchanged(model_data, batch4):
    base = _embedding(model_data)
    emb = _embedding(_with_vector(model_data))
    assert emb.num_fields == 3 + 1 + 2 + 1
    dense = _vector_dense(batch4)
    fields = emb(batch4.sparse, dense, batch4.scenario)
    assert fields.shape == (4, 7, D)
    ref = _fields(base, batch4)
    torch.testing.assert_close(fields[:, :3], ref[:, :3], rtol=0, atol=0)  # sparse fields
    torch.testing.assert_close(fields[:, 4:], ref[:, 3:], rtol=0, atol=0)  # dense scalars, scenario
    proj = emb.vector_proj[0]
    torch.testing.assert_close(fields[:, 3], dense[:, 2:] @ proj.weight.t() + proj.bias)
    fields.sum().backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_vector_field_traces_and_folds(model_data, batch4):
    emb = _embedding(_with_vector(model_data))
    dense = _vector_dense(batch4)
    traced = symbolic_trace(emb)
    torch.testing.assert_close(traced(batch4.sparse, dense, batch4.scenario), emb(batch4.sparse, dense, batch4.scenario),
                               rtol=0, atol=0)
    parts = emb.parts(batch4.sparse, dense, batch4.scenario)
    w, b = torch.randn(7 * D, 3), torch.randn(3)
    torch.testing.assert_close(parts.linear(w, b), parts.stack().flatten(1) @ w + b, rtol=1e-5, atol=1e-5)


def test_configs_without_vectors_keep_their_state_dict(model_data):
    keys = set(_embedding(model_data).state_dict())
    assert not any("vector_proj" in k for k in keys)
    assert {"dense_weight", "dense_bias", "scenario_emb.weight"} <= keys
    assert {"vector_proj.0.weight", "vector_proj.0.bias"} <= set(_embedding(_with_vector(model_data)).state_dict())
