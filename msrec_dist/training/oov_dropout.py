"""OOV dropout: in training, ids of a feature are replaced by its out-of-vocabulary row at a rate.

The converters map every id unseen in train to one row (`oov_id` in the data config). No train
row holds it, so without this that row keeps its random init, and every val/eval row of an unseen
user or item reads noise: in a time split most of them are (ML-100K, 8:1:1 by time: 63-95% of the
val and eval rows per scenario have a user unseen in train). Replacing a random share of the train
ids by the OOV row teaches it what "an id never seen" looks like.

    batch.sparse values [nnz], feature-major segments in KJT key order
      ──per feature with an oov_id: each id → oov_id with probability `rate` (torch's CPU RNG,
        which checkpoints save, so a resumed run draws the same)──► a new KJT, same lengths
"""
from __future__ import annotations

import dataclasses

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msrec_dist.batch import Batch
from msrec_dist.features import FeatureSpec


class OOVDropout:
    """Callable on a host Batch; identity where the rate is 0 or no feature has an oov_id."""

    def __init__(self, features: FeatureSpec, rate: float, names: list[str]) -> None:
        by_name = {f.name: f for f in features.sparse}
        unknown = [n for n in names if n not in by_name or by_name[n].oov_id is None]
        if unknown:
            raise ValueError(f"train.oov_dropout_features {unknown}: not sparse features with an oov_id in the "
                             "data config (the converters write oov_id: 0 for their vocabularies)")
        chosen = names or [f.name for f in features.sparse if f.oov_id is not None]
        # (position in the KJT key order, the OOV row)
        self.targets = [(i, by_name[k].oov_id) for i, k in enumerate(features.kjt_keys) if k in chosen]
        self.rate = rate if self.targets else 0.0

    def __call__(self, batch: Batch) -> Batch:
        if self.rate <= 0 or batch.size == 0:
            return batch
        kjt = batch.sparse
        values = kjt.values().clone()  # [nnz]
        ends = torch.tensor(kjt.length_per_key()).cumsum(0).tolist()
        for i, oov in self.targets:
            seg = values[(ends[i - 1] if i else 0):ends[i]]  # a view: filled in place
            seg.masked_fill_(torch.rand(seg.shape) < self.rate, oov)
        sparse = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths())
        return dataclasses.replace(batch, sparse=sparse)
