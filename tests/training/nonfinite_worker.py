"""Worker of test_nonfinite.test_two_ranks_stop_with_the_same_error: each rank trains a one-layer
model through the plain Trainer; rank 1's third batch holds a NaN. Writes what each rank saw to
<out>/rank<r>.json."""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from msrec_dist.distributed.context import DistContext
from msrec_dist.training.loop import Trainer
from msrec_dist.training.step import NonFiniteLoss


class Batch:
    def __init__(self, x):
        self.x, self.size = x, x.shape[0]

    def to(self, device):
        return self


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, batch):
        return self.lin(batch.x).pow(2).mean(), None


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                      device=torch.device("cpu"), backend="gloo")
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = SimpleNamespace(model=model, dense_params=list(model.parameters()), dense_optimizer=opt,
                            replicated_optimizer=None, grad_sync=None, local_lookup=True,
                            scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    trainer = Trainer(state, None, ctx, grad_clip=0.0)

    def loader():
        for i in range(5):
            x = torch.ones(4, 3)
            if rank == 1 and i == 2:
                x[0, 0] = float("nan")
            yield Batch(x)

    seen = []
    out = {"on_step": seen}
    try:
        trainer.train_epoch(loader(), lambda steps, loss, batch: seen.append(steps) or True)
    except NonFiniteLoss as e:
        out.update(step=e.step, message=str(e))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
