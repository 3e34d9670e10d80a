"""Local lookup (msrec_dist/distributed/local_lookup.py): the embedding calls the sharded EBC's own
kernel, handed to it by FieldEmbedding.use_pooled_lookup, instead of DMP's distributed forward, in a world of one (every table replicated on CPU by
default: dense kernel; or model-parallel: fused kernel) and on 2 ranks with every table replicated
(dense kernel). Same pooled fields, same training (fused row-wise Adagrad
inside the kernel's backward, or the replicated tables' update after the gradient sum; dense
Adam) and the same state_dict as the DMP path; it is off where a train pipeline needs the sharded
module, a table is model-parallel, or the layout differs."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msrec_dist.config import load_experiment
from msrec_dist.data.reader import make_dataloader
from msrec_dist.data.schema import load_data_config
from msrec_dist.distributed.context import init_distributed
from msrec_dist.distributed.local_lookup import find_kernel_lookup
from msrec_dist.training.step import DenseStep, train_step
from msrec_dist.distributed.model_parallel import build_train_state
from tests.distributed.launch import TINY_MODEL


def _state(synth_data, tmp_path, *overrides):
    cfg = load_experiment("configs/msrec_full.yaml", synth_data,
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


def _local(t: torch.Tensor) -> torch.Tensor:
    """A state_dict entry's local values (a ShardedTensor's one shard, or the replicated tensor)."""
    return t.local_shards()[0].tensor if hasattr(t, "local_shards") else t


# () = the CPU default in a world of one: every demo table replicated (dense kernel, the
# replicated tables' optimizer); replicate_max_mb=0: table_wise (fused kernel, Adagrad in backward)
@pytest.mark.parametrize("layout", [(), ("sharding.replicate_max_mb=0",)], ids=["replicated", "table_wise"])
def test_local_lookup_trains_like_the_dmp_path(synth_data, tmp_path, layout):
    cfg, data, fast = _state(synth_data, tmp_path / "a", *layout)
    _, _, slow = _state(synth_data, tmp_path / "b", *layout)
    assert fast.local_lookup and _embedding(fast).pooled_lookup is not None
    assert (fast.replicated_optimizer is not None) == (not layout)
    _embedding(slow).use_pooled_lookup(None)  # the DMP path: input dist, sharded lookup, output dist
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
        torch.testing.assert_close(_local(sd_fast[key]), _local(sd_slow[key]), rtol=1e-5, atol=1e-6, msg=key)
    # the sparse optimizer ran in both (rows of the batches moved away from the init)
    _, _, fresh = _state(synth_data, tmp_path / "c", *layout)
    for key in tables:
        assert (_local(sd_fast[key]) - _local(fresh.model.state_dict()[key])).abs().max() > 0, key


def test_local_lookup_off_for_the_sparse_dist_pipeline(synth_data, tmp_path):
    _, _, state = _state(synth_data, tmp_path, "train.pipeline=sparse_dist")
    assert not state.local_lookup and _embedding(state).pooled_lookup is None


def test_local_lookup_needs_the_kernel_feature_order(synth_data, tmp_path):
    _, data, state = _state(synth_data, tmp_path)
    ebc = _embedding(state).ebc
    assert find_kernel_lookup(ebc, data.kjt_keys, replicated=True) is not None
    assert find_kernel_lookup(ebc, data.kjt_keys, replicated=False) is None  # the kernel is the dense one
    assert data.kjt_keys != data.sparse_names  # the demo schema interleaves the item table's features
    assert find_kernel_lookup(ebc, data.sparse_names, replicated=True) is None


def _two_rank_worker(rank: int, data_yaml: str, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ctx = init_distributed()

        def state(*overrides):
            cfg = load_experiment("configs/msrec_full.yaml", data_yaml, tuple(TINY_MODEL) + (
                f"run.dir={out_dir}/run", "reader.batch_size=32") + overrides)
            data = load_data_config(cfg.data)
            return cfg, data, build_train_state(cfg, data, ctx, total_steps=100)

        cfg, data, fast = state()
        _, _, slow = state()
        _embedding(slow).use_pooled_lookup(None)  # the DMP path
        _, _, table_wise = state("sharding.replicate_max_mb=0")
        _, _, with_ddp = state("train.grad_sync=ddp")
        batches = []
        for b in make_dataloader(data, data.train, cfg.reader, ctx.rank, ctx.world_size):
            batches.append(b)
            if len(batches) == 3:
                break
        b = batches[0]
        fields = [_embedding(s)(b.sparse, b.dense, b.scenario).detach() for s in (fast, slow)]
        steps = {id(s): DenseStep(s, cfg.train.grad_clip) for s in (fast, slow)}
        losses = [[float(train_step(s, b, b.size * 2, 2, steps[id(s)])) for s in (fast, slow)] for b in batches]
        weights = [{k: v.detach().clone() for k, v in s.model.named_parameters()} for s in (fast, slow, with_ddp)]
        torch.save({"local": [_embedding(s).pooled_lookup is not None for s in (fast, slow, table_wise, with_ddp)]
                    + [fast.local_lookup], "fields": fields,
                    "losses": losses, "weights": weights}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_replicated_local_lookup_trains_like_the_dmp_path(synth_data, tmp_path):
    """2 ranks, every table replicated (the demo's tables are under sharding.replicate_max_mb)."""
    mp.spawn(_two_rank_worker, args=(synth_data, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    for o in outs:
        # on for the replicated layout; off for model-parallel tables and under DDP
        assert o["local"] == [True, False, False, False, True]
        torch.testing.assert_close(o["fields"][0], o["fields"][1], rtol=0, atol=0)
        for fast, slow in o["losses"]:
            assert fast == pytest.approx(slow, rel=1e-6, abs=1e-6)
        fast, slow, untrained = o["weights"]
        tables = [k for k in fast if ".embedding_bags." in k]
        assert fast.keys() == slow.keys() and tables
        for key in fast:
            torch.testing.assert_close(fast[key], slow[key], rtol=1e-5, atol=1e-6, msg=key)
        for key in tables:  # the tables learned (same init as the untrained replicated state)
            assert (fast[key] - untrained[key]).abs().max() > 0, key
    for key, value in outs[0]["weights"][0].items():  # and the ranks stay identical
        assert torch.equal(value, outs[1]["weights"][0][key]), key
