"""msrec_dist/dist/collectives.py on real gloo process groups (spawned ranks): the pairwise-exchange
sum equals torch's all_reduce and is bitwise the same on every rank, for 2 and 4 ranks; 3 ranks
take torch's all_reduce; the differentiable form sums gradients over ranks in backward."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msrec_dist.dist import collectives

pytestmark = pytest.mark.dist


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(1000, generator=gen) * 10 ** torch.randint(-3, 4, (1000,), generator=gen)  # float order matters
        want = x.clone()
        dist.all_reduce(want)
        got = collectives.all_reduce_sum_(x.clone())
        ints = collectives.all_reduce_sum_(torch.tensor([rank, 1, 0], dtype=torch.long))
        leaf = torch.full((4, 3), float(rank + 1), requires_grad=True)
        summed = collectives.all_reduce_sum(leaf)  # [4, 3], every entry sum(1..world)
        (summed * (rank + 1)).sum().backward()  # grad of rank r's loss wrt leaf: sum over ranks of (r + 1)
        torch.save({"got": got, "want": want, "ints": ints, "exchange": collectives.uses_exchange(),
                    "summed": summed.detach(), "grad": leaf.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_all_reduce_sum_matches_torch_and_agrees_across_ranks(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    outs = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    total = sum(range(1, world + 1))
    for o in outs:
        assert o["exchange"] == (world in (2, 4))
        torch.testing.assert_close(o["got"], o["want"], rtol=1e-6, atol=1e-5)
        assert torch.equal(o["got"], outs[0]["got"])  # bitwise the same everywhere
        assert o["ints"].tolist() == [sum(range(world)), world, 0]
        assert torch.equal(o["summed"], torch.full((4, 3), float(total)))
        assert torch.equal(o["grad"], torch.full((4, 3), float(total)))
    if world == 2:  # two summands: a + b == b + a exactly, so torch's own sum is matched bit for bit
        assert torch.equal(outs[0]["got"], outs[0]["want"])


def test_power_of_two():
    assert [n for n in range(1, 20) if collectives.is_power_of_two(n)] == [1, 2, 4, 8, 16]
    assert not collectives.is_power_of_two(0)
