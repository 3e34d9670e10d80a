"""grad_sync 'flat' (msrec_dist/distributed/grad_sync.py) on 2 spawned gloo ranks: no DDP anywhere (the
replicated lookups' own DDP taken off, their hooks removed), every dense gradient in one buffer,
the replicated tables' gradient summed on its own, the has-data agreement in a collective of its
own, and after steps on different local batches every rank holds bitwise the same weights. The 1-rank-vs-2-rank loss and table comparisons of tests/distributed/test_multirank.py check
the averaging itself."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from msrec_dist.distributed.grad_sync import FlatGrads, resolve_grad_sync

pytestmark = pytest.mark.dist


def _worker(rank: int, data_yaml: str, init_file: str, out_dir: str, sync: str, host_reduce: str = "auto") -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from msrec_dist.config import load_experiment
        from msrec_dist.data.reader import make_dataloader
        from msrec_dist.data.schema import load_data_config
        from msrec_dist.distributed.context import init_distributed
        from msrec_dist.distributed import grad_sync
        from msrec_dist.training import agreement
        from msrec_dist.training.agreement import agreed_batches
        from msrec_dist.training.loop import build_trainer
        from msrec_dist.distributed.model_parallel import build_train_state
        from tests.distributed.launch import TINY_MODEL

        calls = {"agreement": 0, "gradients": 0}  # the loop's sums: the agreement's own, the gradients'

        def counted(module, key):
            inner = module.all_reduce_sum_

            def wrapper(*args, **kwargs):
                calls[key] += 1
                return inner(*args, **kwargs)
            module.all_reduce_sum_ = wrapper
        counted(agreement, "agreement")
        counted(grad_sync, "gradients")

        cfg = load_experiment("configs/msrec_full.yaml", data_yaml, tuple(TINY_MODEL) + (
            f"run.dir={out_dir}/run", "reader.batch_size=64", f"train.grad_sync={sync}",
            f"train.host_reduce={host_reduce}"))
        data = load_data_config(cfg.data)
        ctx = init_distributed()
        state = build_train_state(cfg, data, ctx, total_steps=100)
        trainer = build_trainer(state, data, ctx, cfg.train)
        step = trainer.dense_step
        # torchrec keeps a sharded EBC's lookups in a plain list, which modules() does not walk
        lookups = [lk for m in state.model.modules() for lk in (getattr(m, "_lookups", None) or [])]
        ddp = sum(isinstance(m, DistributedDataParallel) for m in [*state.model.modules(), *lookups])
        # as Trainer.train_epoch: one agreement, then one step, per batch
        batches = agreed_batches(make_dataloader(data, data.train, cfg.reader, ctx.rank, ctx.world_size), data, ctx)
        for _ in range(3):
            batch, rows = next(batches)
            trainer.step(batch, rows)
        batches.close()
        weights = {k: v.detach().clone() for k, v in state.model.named_parameters()}
        torch.save({"ddp_modules": ddp, "bound": step.flat.bound(), "synced": state.grad_sync is not None,
                    "buffer": step.flat.buffer.numel() if step.flat.buffer is not None else 0,
                    "dense": sum(p.numel() for p in state.dense_params), "weights": weights,
                    "calls": calls, "host_reduce": state.host_reduce,
                    "replicated": len(state.grad_sync.replicated_params) if state.grad_sync else 0},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sync", ["flat", "ddp"])
def test_two_ranks_stay_identical(synth_data, tmp_path, sync):
    mp.spawn(_worker, args=(synth_data, str(tmp_path / "init"), str(tmp_path), sync), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2))
    for o in (a, b):
        assert o["synced"] == (sync == "flat")
        if sync == "flat":
            assert o["ddp_modules"] == 0
            assert o["bound"]  # the gradients stayed views of the one buffer the all-reduce sends
            assert o["buffer"] == o["dense"]  # the dense gradients, nothing else
            # 3 batches, 3 agreements of their own; per step one sum of the dense gradients and one
            # per replicated table kernel's gradient (left out of the buffer)
            assert o["replicated"] >= 1
            assert o["calls"] == {"agreement": 3, "gradients": 3 * (1 + o["replicated"])}
        else:
            assert o["ddp_modules"] >= 2  # the dense modules' DDP and the replicated lookups'
            assert o["calls"] == {"agreement": 3, "gradients": 0}
    assert a["weights"].keys() == b["weights"].keys()
    for key, value in a["weights"].items():
        assert torch.equal(value, b["weights"][key]), key


def test_resolve_grad_sync():
    assert resolve_grad_sync("auto", "cuda") == "ddp"
    assert resolve_grad_sync("auto", "cpu") == "flat"
    assert resolve_grad_sync("ddp", "cpu") == "ddp"
    with pytest.raises(ValueError, match="grad_sync"):
        resolve_grad_sync("bucketed", "cpu")


def test_flat_grads_clip_every_gradient_by_one_norm():
    dense, other = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
    flat = FlatGrads([dense, other])
    (dense * torch.tensor([3.0, 4.0, 0.0]) + other * 0.0).sum().backward()
    assert flat.bound() and flat.buffer.numel() == 4  # the gradients, nothing else
    total = flat.clip_(1.0)
    assert float(total) == pytest.approx(5.0)
    torch.testing.assert_close(dense.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-6)
    assert torch.equal(other.grad, torch.zeros(1))


def _unbound_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from msrec_dist.distributed.grad_sync import FlatAllReduce

        a, a2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
        b, c = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))  # replicated lookups' weights
        flat = FlatGrads([a, a2])
        a.grad = torch.full((3,), float(rank + 1))  # replaced: the buffer path is off
        a2.grad.fill_(4.0 * (rank + 1))  # still a view of the buffer
        b.grad = torch.full((2,), 10.0 * (rank + 1))  # not in the buffer: summed on its own
        c.grad = torch.full((2,), 6.0) if rank == 0 else None  # no gradient on rank 1: zeros there
        bound = flat.bound()
        FlatAllReduce([b, c], None, 2).all_reduce_(flat)
        torch.save({"bound": bound, "a": a.grad.clone(), "a2": a2.grad.clone(), "b": b.grad.clone(),
                    "c": c.grad.clone()}, os.path.join(out_dir, f"u{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_flat_all_reduce_averages_replaced_gradients(tmp_path):
    """When a caller replaced a gradient (views unbound), the average goes through a temporary; the
    replicated lookups' gradients are averaged each on its own, as zeros where a rank has none."""
    mp.spawn(_unbound_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        o = torch.load(tmp_path / f"u{r}.pt")
        assert not o["bound"]
        assert torch.equal(o["a"], torch.full((3,), 1.5)) and torch.equal(o["a2"], torch.full((1,), 6.0))
        assert torch.equal(o["b"], torch.full((2,), 15.0))
        assert torch.equal(o["c"], torch.full((2,), 3.0))


def test_host_reduce_modes_give_bitwise_the_same_training(synth_data, tmp_path):
    """train.host_reduce shm (shared memory) and gloo (pairwise exchange) sum the same two values
    in either order (a + b == b + a), so 3 steps of 2 ranks end with bitwise the same weights."""
    from tests.distributed.test_collectives import needs_shm_op

    if needs_shm_op.args[0]:
        pytest.skip(needs_shm_op.kwargs["reason"])
    weights = {}
    for mode in ("gloo", "shm"):
        run = tmp_path / mode
        run.mkdir()
        mp.spawn(_worker, args=(synth_data, str(run / "init"), str(run), "flat", mode), nprocs=2, join=True)
        outs = [torch.load(run / f"{r}.pt", weights_only=False) for r in range(2)]
        assert [o["host_reduce"] for o in outs] == [mode == "shm"] * 2
        weights[mode] = outs[0]["weights"]
    assert weights["gloo"].keys() == weights["shm"].keys()
    for key, value in weights["gloo"].items():
        assert torch.equal(value, weights["shm"][key]), key
