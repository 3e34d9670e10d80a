"""World-of-one local lookup (msrec_dist/dist/local_lookup.py): the embedding calls the sharded
EBC's own kernel instead of DMP's distributed forward. Same pooled fields, same training (fused
row-wise Adagrad inside the kernel's backward, dense Adam) and the same state_dict as the DMP
path; it is off where a train pipeline needs the sharded module or the layout differs."""
from __future__ import annotations

import torch

from msrec_dist.config import load_experiment
from msrec_dist.data.reader import make_dataloader
from msrec_dist.data.schema import load_data_config
from msrec_dist.dist.context import init_distributed
from msrec_dist.dist.local_lookup import find_kernel_lookup
from msrec_dist.dist.loop import DenseStep, train_step
from msrec_dist.dist.model_parallel import build_train_state
from tests.dist.launch import TINY_MODEL


def _state(synth_data, tmp_path, *overrides):
    cfg = load_experiment("configs/msrec.yaml", synth_data,
                          tuple(TINY_MODEL) + (f"run.dir={tmp_path}", "reader.batch_size=64") + overrides)
    data = load_data_config(cfg.data)
    return cfg, data, build_train_state(cfg, data, init_distributed(), total_steps=100)


def _batches(cfg, data, n):
    out = []
    for b in make_dataloader(data, data.train, cfg.reader):
        out.append(b)
        if len(out) == n:
            return out
    return out


def _embedding(state):
    return state.model.module.model.embedding


def test_local_lookup_trains_like_the_dmp_path(synth_data, tmp_path):
    cfg, data, fast = _state(synth_data, tmp_path / "a")
    _, _, slow = _state(synth_data, tmp_path / "b")
    assert fast.local_lookup and _embedding(fast).local_lookup is not None
    _embedding(slow).local_lookup = None  # the DMP path: input dist, sharded lookup, output dist
    batches = _batches(cfg, data, 4)
    assert batches[0].sparse.keys() == data.kjt_keys
    emb_fast, emb_slow = _embedding(fast), _embedding(slow)
    b = batches[0]
    torch.testing.assert_close(emb_fast(b.sparse, b.dense, b.scenario), emb_slow(b.sparse, b.dense, b.scenario),
                               rtol=0, atol=0)
    steps = {id(s): DenseStep(s, cfg.train.grad_clip) for s in (fast, slow)}
    for b in batches:
        losses = [train_step(s, b, b.size, 1, steps[id(s)]) for s in (fast, slow)]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    sd_fast, sd_slow = fast.model.state_dict(), slow.model.state_dict()
    assert list(sd_fast) == list(sd_slow)  # checkpoints do not see which path ran
    tables = [k for k in sd_fast if ".embedding_bags." in k]
    assert tables
    for key in sd_fast:
        a, s = sd_fast[key], sd_slow[key]
        if hasattr(a, "local_shards"):
            a, s = a.local_shards()[0].tensor, s.local_shards()[0].tensor
        torch.testing.assert_close(a, s, rtol=1e-5, atol=1e-6, msg=key)
    # the sparse optimizer ran in both (rows of the batches moved away from the init)
    _, _, fresh = _state(synth_data, tmp_path / "c")
    key = tables[0]
    moved = sd_fast[key].local_shards()[0].tensor - fresh.model.state_dict()[key].local_shards()[0].tensor
    assert moved.abs().max() > 0


def test_local_lookup_off_for_the_sparse_dist_pipeline(synth_data, tmp_path):
    _, _, state = _state(synth_data, tmp_path, "train.pipeline=sparse_dist")
    assert not state.local_lookup and _embedding(state).local_lookup is None


def test_local_lookup_needs_the_kernel_feature_order(synth_data, tmp_path):
    _, data, state = _state(synth_data, tmp_path)
    ebc = _embedding(state).ebc
    assert find_kernel_lookup(ebc, data.kjt_keys) is not None
    assert data.kjt_keys != data.sparse_names  # the demo schema interleaves the item table's features
    assert find_kernel_lookup(ebc, data.sparse_names) is None
