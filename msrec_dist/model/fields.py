"""The field stack in factored form, and the first linear layer over it without building the stack.

    FieldEmbedding.parts(...) ──► FieldParts
        pooled  [B, F_s, D]   sparse fields (pooled, mean-divided, gradient-scaled)
        dense   [B, N_d]      raw dense values: dense field n = dense[:, n] · w_n + b_n   (w, b [N_d, D])
        onehot  [B, S]        scenario one-hot: the scenario field = onehot @ E_s       (E_s [S, D])
    .stack()                 ──► [B, F, D], F = F_s + N_d (+ 1): what FieldEmbedding.forward returns
    .linear(W [F·D, N], b)   ──► [B, N] = stack().flatten(1) @ W + b, computed as one GEMM
          inputs [B, K] = [pooled | dense | onehot | 1 | 0 …]
          @ [W_pooled; A; C; b + c0; 0 …],   A [N_d, N] = w_n · W_n,  c0 [N] = Σ_n b_n · W_n,
                                             C [S, N]  = E_s @ W_scenario
          K = F_s·D + N_d + S + 1, padded with zero columns to a multiple of 8

Why: a dense field is rank one in its input value and the scenario field picks one of S rows, so
the first layer after the field stack needs one input column per dense feature and S for the
scenario, not D each (ple, D = 16: inner size 160 → 87, the first CGC level's GEMMs 3.8 → 2.1 ms).
The bias rides in the GEMM as a ones column (no bias copy into the output first) and the inner
size is padded to whole 8-float vectors, which MKL's input-gradient GEMM runs faster (87 → 88
columns: 833 → 694 µs). Same parameters, same function, same gradients; only the floats are
summed in another order. The models whose
first layer reads the flat field stack directly (no attention, no STAR) use it
(ModelConfig.fold_fields); the folded weights are a few small products per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class FieldParts:
    pooled: torch.Tensor  # [B, F_s, D]
    dense: torch.Tensor  # [B, N_d]
    dense_weight: torch.Tensor  # [N_d, D]
    dense_bias: torch.Tensor  # [N_d, D]
    onehot: Optional[torch.Tensor] = None  # [B, S], with the scenario field
    scenario_weight: Optional[torch.Tensor] = None  # [S, D], with the scenario field
    _inputs: Optional[torch.Tensor] = field(default=None, repr=False)  # [B, K], built once
    _factors: Optional[torch.Tensor] = field(default=None, repr=False)  # [N_d, 2, D], built once

    def stack(self) -> torch.Tensor:
        """The field stack [B, F, D] (sparse, dense, scenario fields in that order)."""
        dense_fields = torch.addcmul(self.dense_bias, self.dense.unsqueeze(2), self.dense_weight)  # [B, N_d, D]
        fields = [self.pooled, dense_fields]
        if self.onehot is not None:
            fields.append((self.onehot @ self.scenario_weight).unsqueeze(1))  # [B, 1, D]
        return torch.cat(fields, dim=1)  # [B, F, D]

    def inputs(self) -> torch.Tensor:
        """[B, K]: the columns the folded weight multiplies, [pooled | dense | onehot | 1 | 0 …]
        (shared by every first-layer consumer, e.g. a CGC level's experts and gates)."""
        if self._inputs is None:
            cols = [self.pooled.flatten(1), self.dense] + ([self.onehot] if self.onehot is not None else [])
            self._inputs = with_bias_column(cols)
        return self._inputs

    def fold(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """weight [F·D, N], bias [N] over the flat stack → the folded weight [K, N] that inputs()
        multiplies: rows for the pooled, dense and scenario columns, the bias row, zero rows."""
        num_dense, dim = self.dense_weight.shape
        sizes = [self.pooled.size(1) * dim, num_dense * dim] + ([dim] if self.onehot is not None else [])
        parts = torch.split(weight, sizes, dim=0)  # one SplitBackward, not a zero-filled copy per slice
        w_dense = parts[1].reshape(num_dense, dim, weight.size(1))  # [N_d, D, N] (N_d may be 0)
        if self._factors is None:  # shared by every first-layer consumer (a CGC level's experts and gates)
            self._factors = torch.stack([self.dense_weight, self.dense_bias], dim=1)  # [N_d, 2, D]
        projected = torch.bmm(self._factors, w_dense)  # [N_d, 2, N]: rows w_n·W_n and b_n·W_n
        rows = [parts[0], projected[:, 0]]
        if self.onehot is not None:
            rows.append(self.scenario_weight @ parts[2])  # [S, N]
        return with_bias_row(rows, bias + projected[:, 1].sum(0))

    def linear(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """stack().flatten(1) @ weight + bias, weight [F·D, N], bias [N] → [B, N], without the stack."""
        return torch.mm(self.inputs(), self.fold(weight, bias))  # [B, N]


GEMM_ALIGN = 8  # the folded GEMM's inner size is a multiple of this (floats per AVX2 vector)


def bias_column_padding(width: int) -> int:
    """Zero columns after the ones column so that the inner size width + 1 + pad is aligned."""
    return -(width + 1) % GEMM_ALIGN


def with_bias_column(cols: list[torch.Tensor]) -> torch.Tensor:
    """[B, w_i] columns → [B, K] = [cols | 1 | 0 …] (K = Σ w_i + 1, padded to GEMM_ALIGN).

    An FX leaf (torch.fx.wrap below): it sizes the padding from the tensors' widths."""
    batch, width = cols[0].size(0), sum(c.size(1) for c in cols)
    ones = cols[0].new_ones(batch, 1 + bias_column_padding(width))
    ones[:, 1:] = 0
    return torch.cat(cols + [ones], dim=1)


def with_bias_row(rows: list[torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """[k_i, N] weight rows and the bias [N] → [K, N] = [rows; bias; 0 …], matching with_bias_column.

    An FX leaf (torch.fx.wrap below), as with_bias_column."""
    width = sum(r.size(0) for r in rows)
    tail = [bias.unsqueeze(0)]
    pad = bias_column_padding(width)
    if pad:
        tail.append(bias.new_zeros(pad, bias.size(0)))
    return torch.cat(rows + tail, dim=0)


torch.fx.wrap("with_bias_column")
torch.fx.wrap("with_bias_row")
