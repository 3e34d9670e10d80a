"""msrec_dist/distributed/collectives.py on real gloo process groups (spawned ranks): the pairwise-exchange
sum equals torch's all_reduce and is bitwise the same on every rank, for 2 and 4 ranks; 3 ranks
take torch's all_reduce; the differentiable form sums gradients over ranks in backward. The
shared-memory sum (csrc/shm_all_reduce.cpp) the same for 2, 3 and 4 ranks, over several rounds,
every dtype it takes and odd layouts, and its errors: tensors that differ in size, a rank that
never comes (the timeout names it, and the rank waiting for it sleeps rather than spins), a
segment that cannot be made, a group it cannot serve."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msrec_dist.distributed import collectives
from tests.kernels.utils import csrc_mark

pytestmark = pytest.mark.dist


needs_shm_op = csrc_mark(collectives.shm_op_missing())  # skip, or fail under MSREC_REQUIRE_CSRC=1


def _spawn(worker, tmp_path, world: int, *args) -> list:
    """Run worker(rank, *args, init_file, out_dir) on `world` spawned ranks; each rank's saved output."""
    mp.spawn(worker, args=(*args, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"{r}.pt") if (tmp_path / f"{r}.pt").exists() else None for r in range(world)]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(1000, generator=gen) * 10 ** torch.randint(-3, 4, (1000,), generator=gen)  # float order matters
        want = x.clone()
        dist.all_reduce(want)
        got = collectives.all_reduce_sum_(x.clone())
        mean = collectives.all_reduce_sum_(x.clone(), divisor=world)
        ints = collectives.all_reduce_sum_(torch.tensor([rank, 1, 0], dtype=torch.long))
        leaf = torch.full((4, 3), float(rank + 1), requires_grad=True)
        summed = collectives.all_reduce_sum(leaf)  # [4, 3], every entry sum(1..world)
        (summed * (rank + 1)).sum().backward()  # grad of rank r's loss wrt leaf: sum over ranks of (r + 1)
        torch.save({"got": got, "mean": mean, "want": want, "ints": ints, "exchange": collectives.uses_exchange(),
                    "summed": summed.detach(), "grad": leaf.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_all_reduce_sum_matches_torch_and_agrees_across_ranks(tmp_path, world):
    outs = _spawn(_worker, tmp_path, world, world)
    total = sum(range(1, world + 1))
    for o in outs:
        assert o["exchange"] == (world in (2, 4))
        torch.testing.assert_close(o["got"], o["want"], rtol=1e-6, atol=1e-5)
        assert torch.equal(o["got"], outs[0]["got"])  # bitwise the same everywhere
        assert torch.equal(o["mean"], o["got"] / world)  # divisor: the sum, then a division
        assert o["ints"].tolist() == [sum(range(world)), world, 0]
        assert torch.equal(o["summed"], torch.full((4, 3), float(total)))
        assert torch.equal(o["grad"], torch.full((4, 3), float(total)))
    if world == 2:  # two summands: a + b == b + a exactly, so torch's own sum is matched bit for bit
        assert torch.equal(outs[0]["got"], outs[0]["want"])


def test_power_of_two():
    assert [n for n in range(1, 20) if collectives.is_power_of_two(n)] == [1, 2, 4, 8, 16]
    assert not collectives.is_power_of_two(0)


def _shm_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(1000, generator=gen) * 10 ** torch.randint(-3, 4, (1000,), generator=gen)
        want = x.clone()
        dist.all_reduce(want)
        small = collectives.SharedMemoryAllReduce(dist.group.WORLD, timeout_s=60.0, slot_bytes=256)  # 64 floats a round
        got_rounds = small(x.clone())
        mean_rounds = small(x.clone(), world)  # divided in the sum's pass, round by round
        rounds_after = small.rounds
        auto = collectives.enable_host_reduce("auto")  # only with a core per rank
        assert collectives.enable_host_reduce("shm")  # all_reduce_sum_ goes through shared memory from now on
        got = collectives.all_reduce_sum_(x.clone())
        try:
            collectives.all_reduce_sum_(torch.ones(3, dtype=torch.long), divisor=2)
            int_divisor = None
        except ValueError as e:
            int_divisor = str(e)
        try:  # the op's own check, for a caller that skips the wrapper
            torch.ops.msrec.shm_all_reduce_sum_(torch.ones(3, dtype=torch.long), small.region, rank, world,
                                                small.rounds, 60.0, 2)
            op_int_divisor = None
        except RuntimeError as e:
            op_int_divisor = str(e)
        out = {"want": want, "got": got, "got_rounds": got_rounds, "rounds": rounds_after, "auto": auto,
               "mean": collectives.all_reduce_sum_(x.clone(), divisor=world), "mean_rounds": mean_rounds,
               "mean_f64": collectives.all_reduce_sum_(torch.arange(5, dtype=torch.float64) * (rank + 1), divisor=3),
               "int_divisor": int_divisor, "op_int_divisor": op_int_divisor,
               "f64": collectives.all_reduce_sum_(torch.arange(5, dtype=torch.float64) * (rank + 1)),
               "i64": collectives.all_reduce_sum_(torch.tensor([rank, 1, 2 ** 40], dtype=torch.long)),
               "i32": collectives.all_reduce_sum_(torch.tensor([rank, 1], dtype=torch.int32)),
               "strided": collectives.all_reduce_sum_(torch.full((6, 4), float(rank + 1)).t()),  # non-contiguous
               "empty": collectives.all_reduce_sum_(torch.empty(0))}
        leaf = torch.full((4, 3), float(rank + 1), requires_grad=True)
        summed = collectives.all_reduce_sum(leaf)
        (summed * (rank + 1)).sum().backward()
        out.update(summed=summed.detach(), grad=leaf.grad)
        try:  # ranks disagree on the size: every rank gets an error naming it, none hangs
            collectives.all_reduce_sum_(torch.ones(10 + rank))
            out["mismatch"] = None
        except RuntimeError as e:
            out["mismatch"] = str(e)
        try:  # and the sums after it refuse to run out of step
            collectives.all_reduce_sum_(torch.ones(3))
            out["after"] = None
        except RuntimeError as e:
            out["after"] = str(e)
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        collectives.disable_host_reduce()
        dist.destroy_process_group()


@needs_shm_op
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shared_memory_sum_matches_torch_and_agrees_across_ranks(tmp_path, world):
    outs = _spawn(_shm_worker, tmp_path, world, world)
    total = sum(range(1, world + 1))
    from msrec_dist.runtime import allowed_cores

    for o in outs:
        # 'auto' spins only where every rank can have a core (4 ranks on a 2-core machine: gloo)
        assert o["auto"] == (len(allowed_cores()) >= world)
        torch.testing.assert_close(o["got"], o["want"], rtol=1e-6, atol=1e-5)
        assert torch.equal(o["got"], outs[0]["got"])  # bitwise the same everywhere
        assert torch.equal(o["got_rounds"], o["got"])  # 16 rounds of 64 floats: the same sum
        # divided in the sum's pass: bitwise the sum followed by a division (by 2 or 4 a
        # multiplication by the exact reciprocal, by 3 a division), in one round or sixteen
        assert torch.equal(o["mean"], o["got"] / world) and torch.equal(o["mean_rounds"], o["got"] / world)
        assert torch.equal(o["mean_f64"], torch.arange(5, dtype=torch.float64) * total / 3)
        assert "needs a floating tensor" in o["int_divisor"] and "needs a floating type" in o["op_int_divisor"]
        assert o["rounds"] == 32
        assert o["f64"].dtype == torch.float64 and o["f64"].tolist() == [float(i * total) for i in range(5)]
        assert o["i64"].tolist() == [sum(range(world)), world, world * 2 ** 40]
        assert o["i32"].dtype == torch.int32 and o["i32"].tolist() == [sum(range(world)), world]
        assert o["strided"].shape == (4, 6) and torch.equal(o["strided"], torch.full((4, 6), float(total)))
        assert o["empty"].numel() == 0
        assert torch.equal(o["summed"], torch.full((4, 3), float(total)))
        assert torch.equal(o["grad"], torch.full((4, 3), float(total)))
        assert o["mismatch"] is not None and "differ in size" in o["mismatch"]
        assert o["after"] is not None and "an earlier sum failed" in o["after"]
    if world == 2:  # two summands: a + b == b + a exactly, so torch's own sum is matched bit for bit
        assert torch.equal(outs[0]["got"], outs[0]["want"])


def _timeout_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shm = collectives.SharedMemoryAllReduce(dist.group.WORLD, timeout_s=0.5)
        if rank == 0:  # rank 1 never sums: rank 0 must not wait for ever
            try:
                shm(torch.ones(3))
                msg = None
            except RuntimeError as e:
                msg = str(e)
            torch.save(msg, os.path.join(out_dir, "0.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@needs_shm_op
def test_shared_memory_sum_times_out_naming_the_missing_rank(tmp_path):
    msg = _spawn(_timeout_worker, tmp_path, 2)[0]
    assert msg is not None and "rank 0 waited more than 0.5 s for rank 1" in msg
    if os.path.isdir("/dev/shm"):  # the segment's name is gone once every rank has mapped it
        assert not [f for f in os.listdir("/dev/shm") if f.startswith("msrec_allreduce_")]


def _stalled_worker(rank: int, timeout_s: float, init_file: str, out_dir: str) -> None:
    import time

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shm = collectives.SharedMemoryAllReduce(dist.group.WORLD, timeout_s=timeout_s)
        shm(torch.ones(3))  # one sum together: both ranks are past their start
        if rank == 0:  # rank 1 never sums again: rank 0 waits for it until the timeout
            wall0, cpu0 = time.monotonic(), time.process_time()  # this process's CPU time, all threads
            try:
                shm(torch.ones(3))
                msg = None
            except RuntimeError as e:
                msg = str(e)
            torch.save({"msg": msg, "wall": time.monotonic() - wall0, "cpu": time.process_time() - cpu0},
                       os.path.join(out_dir, "0.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@needs_shm_op
def test_shared_memory_wait_for_a_missing_rank_is_bounded_and_sleeps(tmp_path):
    """A peer that never comes (dead, or stopped, with no launcher to end the run): the waiting
    rank raises after timeout_s, naming it, and leaves its core idle meanwhile: it spins only
    briefly, then sleeps (a pure spin would cost ~100% of a core for the whole timeout)."""
    timeout_s = 2.0
    out = _spawn(_stalled_worker, tmp_path, 2, timeout_s)[0]
    assert out["msg"] is not None and f"rank 0 waited more than {timeout_s:g} s for rank 1" in out["msg"], out["msg"]
    assert timeout_s <= out["wall"] < timeout_s + 1.0, out["wall"]
    assert out["cpu"] < 0.2 * out["wall"], f"{out['cpu']:.2f} s of CPU in {out['wall']:.2f} s of waiting"


def test_enable_host_reduce_where_it_cannot(tmp_path):
    """A world of one: 'auto' keeps the plain path, 'shm' says why it cannot, a bad mode is named."""
    owned = not dist.is_initialized()  # an in-process run of an earlier test may have left its world of one
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        assert collectives.enable_host_reduce("auto") is False
        assert collectives.enable_host_reduce("gloo") is False
        with pytest.raises(ValueError, match="needs a gloo group of several ranks"):
            collectives.enable_host_reduce("shm")
        with pytest.raises(ValueError, match="host_reduce must be one of"):
            collectives.enable_host_reduce("nvlink")
    finally:
        if owned:
            dist.destroy_process_group()


def _no_room_worker(rank: int, init_file: str, out_dir: str) -> None:
    import warnings

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        huge = 1 << 50  # no file system reserves 2^52 bytes: posix_fallocate fails on rank 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            auto = collectives.enable_host_reduce("auto", slot_bytes=huge)
        try:
            collectives.enable_host_reduce("shm", slot_bytes=huge)
            forced = None
        except collectives.SharedMemoryUnavailable as e:
            forced = str(e)
        summed = collectives.all_reduce_sum_(torch.tensor([rank + 1.0]))  # the exchange still sums
        torch.save({"auto": auto, "warned": [str(w.message) for w in caught], "forced": forced, "sum": summed},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        collectives.disable_host_reduce()
        dist.destroy_process_group()


@needs_shm_op
def test_shared_memory_without_room_falls_back_on_every_rank(tmp_path):
    for o in _spawn(_no_room_worker, tmp_path, 2):
        assert o["auto"] is False
        assert any("cannot reserve" in w and "summing over gloo instead" in w for w in o["warned"])
        assert o["forced"] is not None and "cannot reserve" in o["forced"]
        assert o["sum"].tolist() == [3.0]
    if os.path.isdir("/dev/shm"):  # the failed file is removed too
        assert not [f for f in os.listdir("/dev/shm") if f.startswith("msrec_allreduce_")]
