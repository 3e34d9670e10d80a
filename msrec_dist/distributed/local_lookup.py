"""Local embedding lookup: the sharded EBC's own batched table kernel, called directly, where
every rank holds every table it looks up (a world of one, or every table replicated).

    batch.sparse (KJT, keys in FeatureSpec.kjt_keys order = the kernel's feature order)
      ──the kernel module DMP built──► [B, F_s * D]
        world of one, tables model-parallel: fbgemm TBE with the fused optimizer in backward
                                (BatchedFusedEmbeddingBag; a CUDA world of one)
        all tables replicated:  fbgemm dense TBE (BatchedDenseEmbeddingBag, data_parallel): the
                                weights' .grad, averaged over ranks by grad_sync 'flat' (a world
                                of one: as is) and stepped by distributed/replicated.py, as on the DMP
                                path (a CPU world of one replicates its small tables too:
                                distributed/sharding.py default_types)

In a world of one, DMP's sharded EmbeddingBagCollection still wraps its single lookup in the
machinery of many ranks: a KJT splits all-to-all and a values all-to-all with itself over gloo,
a feature permute, awaitables, an output "all-to-all" and a KeyedTensor (ple batch of 1024 rows:
forward + backward 3.4 ms vs 1.7 ms for the kernel alone). torchrec has no shortcut for it, hence
this one. With every table replicated on several ranks, DMP's input and output "distributions"
are no-ops around the same local kernel, but the awaitables, KeyedTensor and per-feature split
remain.

model_parallel.build_train_state hands the KernelLookup to the model
(FieldEmbedding.use_pooled_lookup); the model calls it instead of the EBC and gets the pooled
fields as one tensor in KJT key order, with no KeyedTensor. The kernel module is the one inside
the sharded EBC, which stays the model's registered submodule: same weights, same fused row-wise
Adagrad state, so DMP's state_dict, the sharding plan and checkpoints are exactly as without it;
only the forward path differs. It is used only when the layout is the plain one it assumes (one
lookup, one batched kernel over every feature in KJT key order) and no train pipeline has to find
the sharded module by tracing; otherwise the DMP path runs.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BatchedDenseEmbeddingBag, BatchedFusedEmbeddingBag
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

log = logging.getLogger(__name__)


class KernelLookup:
    """Callable KJT → pooled [B, F_s * D] through one torchrec batched-fused kernel module.

    A plain object, not an nn.Module, so the kernel is not registered twice in the model."""

    def __init__(self, kernel: nn.Module) -> None:
        self.kernel = kernel

    def __call__(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.kernel(sparse)  # [B, F_s * D], features in kernel (= KJT key) order


def kernel_features(kernel: nn.Module) -> list[str]:
    """The features of a batched kernel in the order it expects them (table by table)."""
    return [f for table in kernel.config.embedding_tables for f in table.feature_names]


def find_kernel_lookup(sharded_ebc: nn.Module, kjt_keys: list[str], replicated: bool = False) -> Optional[KernelLookup]:
    """A KernelLookup over the sharded EBC's kernel, or None (with the reason logged) when its
    layout is not one lookup (not wrapped: DDP must see its own forward) of one batched kernel over
    exactly `kjt_keys` in order: fused (a world of one) or, with `replicated` (every table
    data_parallel), dense."""
    lookups = list(getattr(sharded_ebc, "_lookups", []))
    if len(lookups) != 1 or not isinstance(lookups[0], GroupedPooledEmbeddingsLookup):
        log.info("local lookup off: %d lookups of types %s", len(lookups), [type(x).__name__ for x in lookups])
        return None
    kernels = list(lookups[0]._emb_modules)
    if len(kernels) != 1 or type(kernels[0]) is not (BatchedDenseEmbeddingBag if replicated else BatchedFusedEmbeddingBag):
        log.info("local lookup off: kernels %s", [type(k).__name__ for k in kernels])
        return None
    if kernel_features(kernels[0]) != list(kjt_keys):
        log.info("local lookup off: kernel features %s differ from the KJT keys %s",
                 kernel_features(kernels[0]), kjt_keys)
        return None
    return KernelLookup(kernels[0])
