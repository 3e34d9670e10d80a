"""The field stack in factored form, and the first linear layer over it without building the stack.

    FieldEmbedding.parts(...) ──► FieldParts
        pooled  [B, F_s, D]   sparse fields (pooled, mean-divided, gradient-scaled)
        dense   [B, N_d]      raw dense values: dense field n = dense[:, n] · w_n + b_n   (w, b [N_d, D])
        onehot  [B, S]        scenario one-hot: the scenario field = onehot @ E_s       (E_s [S, D])
    .stack()                 ──► [B, F, D], F = F_s + N_d (+ 1): what FieldEmbedding.forward returns
    .linear(W [F·D, N], b)   ──► [B, N] = stack().flatten(1) @ W + b, computed as
          inputs [B, F_s·D + N_d + S] = [pooled | dense | onehot]
          @ [W_pooled; A; C] + (b + c0),   A [N_d, N] = w_n · W_n,  c0 [N] = Σ_n b_n · W_n,
                                           C [S, N]  = E_s @ W_scenario

Why: a dense field is rank one in its input value and the scenario field picks one of S rows, so
the first layer after the field stack needs one input column per dense feature and S for the
scenario, not D each. For the ple config (5 sparse + 4 dense fields + the scenario, D = 16) the
GEMM's inner size drops from 160 to 87: the first CGC level's expert GEMMs at B = 1024 (forward,
input gradient, weight gradient) measured 3.8 → 2.0–2.2 ms on this project's CPU. Same parameters,
same function, same gradients; only the floats are summed in another order. The models whose
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
    _inputs: Optional[torch.Tensor] = field(default=None, repr=False)  # [B, F_s·D + N_d + S], built once

    def stack(self) -> torch.Tensor:
        """The field stack [B, F, D] (sparse, dense, scenario fields in that order)."""
        dense_fields = torch.addcmul(self.dense_bias, self.dense.unsqueeze(2), self.dense_weight)  # [B, N_d, D]
        fields = [self.pooled, dense_fields]
        if self.onehot is not None:
            fields.append((self.onehot @ self.scenario_weight).unsqueeze(1))  # [B, 1, D]
        return torch.cat(fields, dim=1)  # [B, F, D]

    def inputs(self) -> torch.Tensor:
        """[B, F_s·D + N_d + S]: the columns the folded weight multiplies (shared by every
        first-layer consumer, e.g. a CGC level's experts and gates)."""
        if self._inputs is None:
            cols = [self.pooled.flatten(1), self.dense] + ([self.onehot] if self.onehot is not None else [])
            self._inputs = torch.cat(cols, dim=1)
        return self._inputs

    def fold(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weight [F·D, N] over the flat stack → (folded weight [F_s·D + N_d + S, N], offset [N])."""
        num_dense, dim = self.dense_weight.shape
        sizes = [self.pooled.size(1) * dim, num_dense * dim] + ([dim] if self.onehot is not None else [])
        parts = torch.split(weight, sizes, dim=0)  # one SplitBackward, not a zero-filled copy per slice
        w_dense = parts[1].reshape(num_dense, dim, weight.size(1))  # [N_d, D, N] (N_d may be 0)
        factors = torch.stack([self.dense_weight, self.dense_bias], dim=1)  # [N_d, 2, D]
        projected = torch.bmm(factors, w_dense)  # [N_d, 2, N]: rows w_n·W_n and b_n·W_n
        rows = [parts[0], projected[:, 0]]
        if self.onehot is not None:
            rows.append(self.scenario_weight @ parts[2])  # [S, N]
        return torch.cat(rows, dim=0), projected[:, 1].sum(0)

    def linear(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """stack().flatten(1) @ weight + bias, weight [F·D, N], bias [N] → [B, N], without the stack."""
        folded, offset = self.fold(weight)
        return torch.addmm(bias + offset, self.inputs(), folded)  # [B, N]
