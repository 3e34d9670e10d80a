"""The one batch type that flows reader → sharded embeddings → dense net → loss and metrics.

    sparse   KeyedJaggedTensor, keys = sparse feature names in FeatureSpec.kjt_keys order
             (grouped by table: the order of the embedding kernel's features)
             (feature f, sample b) holds the ids of one bag; lengths are feature-major [F * B]
    dense    [B, Nd] float32 dense features
    labels   [B, T]  float32 0/1 labels, one column per task
    scenario [B]     int64 scenario index in 0..S-1
    rows     [B]     int64 global row index (position in the ordered file list), for exact
                     resume and for tests that check every row is read once

It implements torchrec's `Pipelineable` so torchrec's train pipelines can copy it to the GPU
and overlap the copy with compute. It lives outside msrec_dist.data and msrec_dist.model: the
reader (data) builds it and the model reads it, and neither imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    sparse: KeyedJaggedTensor
    dense: torch.Tensor  # [B, Nd]
    labels: torch.Tensor  # [B, T]
    scenario: torch.Tensor  # [B]
    rows: torch.Tensor  # [B]

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            scenario=self.scenario.to(device=device, non_blocking=non_blocking),
            rows=self.rows.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        for t in (self.dense, self.labels, self.scenario, self.rows):
            t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            sparse=self.sparse.pin_memory(),
            dense=self.dense.pin_memory(),
            labels=self.labels.pin_memory(),
            scenario=self.scenario.pin_memory(),
            rows=self.rows.pin_memory(),
        )
