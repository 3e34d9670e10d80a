"""The factored field stack (msrec_dist/model/fields.py): FieldParts.linear equals a linear layer
over the materialized stack, values and gradients of every input and weight, with and without the
scenario field; an empty batch; the MLP / StackedLinear / first-CGC-level consumers."""
from __future__ import annotations

import pytest
import torch

from msrec_dist.model.fields import FieldParts
from msrec_dist.model.mlp import MLP, StackedLinear

B, F_S, N_D, S, D, N = 6, 3, 2, 3, 4, 5


def _parts(scenario: bool, batch: int = B, seed: int = 0, num_dense: int = N_D) -> FieldParts:
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    parts = FieldParts(pooled=leaf(batch, F_S, D), dense=torch.randn(batch, num_dense, generator=g, dtype=torch.float64),
                       dense_weight=leaf(num_dense, D), dense_bias=leaf(num_dense, D))
    if scenario:
        ids = torch.randint(0, S, (batch,), generator=g)
        parts.onehot = torch.nn.functional.one_hot(ids, S).to(torch.float64)
        parts.scenario_weight = leaf(S, D)
    return parts


def _leaves(parts: FieldParts, weight, bias) -> list[torch.Tensor]:
    out = [parts.pooled, parts.dense_weight, parts.dense_bias, weight, bias]
    return out + ([parts.scenario_weight] if parts.scenario_weight is not None else [])


@pytest.mark.parametrize("scenario", [True, False], ids=["scenario_field", "no_scenario_field"])
def test_folded_linear_equals_linear_over_the_stack(scenario):
    parts = _parts(scenario)
    fields = F_S + N_D + (1 if scenario else 0)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(fields * D, N, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(N, generator=g, dtype=torch.float64).requires_grad_()
    stack = parts.stack()
    assert stack.shape == (B, fields, D)
    # the stack's fields: sparse as given, dense x_n * w_n + b_n, scenario = its weight row
    torch.testing.assert_close(stack[:, :F_S], parts.pooled, rtol=0, atol=0)
    torch.testing.assert_close(stack[:, F_S + 1], parts.dense[:, 1:2] * parts.dense_weight[1] + parts.dense_bias[1])
    if scenario:
        torch.testing.assert_close(stack[:, -1], parts.scenario_weight[parts.onehot.argmax(1)], rtol=0, atol=0)
    upstream = torch.randn(B, N, generator=g, dtype=torch.float64)
    leaves = _leaves(parts, weight, bias)
    reference = stack.flatten(1) @ weight + bias
    ref_grads = torch.autograd.grad(reference, leaves, upstream)
    folded = parts.linear(weight, bias)
    grads = torch.autograd.grad(folded, leaves, upstream)
    torch.testing.assert_close(folded, reference, rtol=1e-12, atol=1e-12)
    for leaf, got, want in zip(["pooled", "dense_weight", "dense_bias", "weight", "bias", "scenario_weight"],
                               grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{leaf}: {m}")
    # the folded GEMM's inner size: D per sparse field, 1 per dense feature, S for the scenario, 1
    # for the bias, then zero columns up to a multiple of 8; the inputs end [.. | 1 | 0 ..]
    width = F_S * D + N_D + (S if scenario else 0)
    inputs = parts.inputs()
    assert inputs.shape == (B, -(-(width + 1) // 8) * 8)
    assert inputs[:, width].eq(1).all() and inputs[:, width + 1:].eq(0).all()
    torch.testing.assert_close(inputs[:, :F_S * D], parts.pooled.flatten(1), rtol=0, atol=0)


def test_no_dense_features():
    parts = _parts(True, num_dense=0)
    weight = torch.randn((F_S + 1) * D, N, dtype=torch.float64)
    bias = torch.randn(N, dtype=torch.float64)
    torch.testing.assert_close(parts.linear(weight, bias), parts.stack().flatten(1) @ weight + bias,
                               rtol=1e-12, atol=1e-12)


def test_empty_batch_folds_to_bias():
    parts = _parts(True, batch=0)
    weight = torch.randn((F_S + N_D + 1) * D, N, dtype=torch.float64)
    assert parts.linear(weight, torch.zeros(N, dtype=torch.float64)).shape == (0, N)


def test_first_layers_fold_the_parts():
    """MLP's first Linear and a shared-input StackedLinear give on FieldParts what they give on the
    flat stack (ReLU included)."""
    parts = _parts(True)
    flat = parts.stack().flatten(1)
    in_dim = flat.size(1)
    torch.manual_seed(0)
    mlp = MLP(in_dim, [7, 3]).double()
    torch.testing.assert_close(mlp(parts), mlp(flat), rtol=1e-12, atol=1e-12)
    assert MLP(in_dim, [])(parts) is parts  # no layers: the parts pass on to the next block
    stacked = StackedLinear(4, in_dim, 3).double()
    out = stacked(parts, relu=True)
    assert out.shape == (4, B, 3)
    torch.testing.assert_close(out, stacked(flat, relu=True), rtol=1e-12, atol=1e-12)
