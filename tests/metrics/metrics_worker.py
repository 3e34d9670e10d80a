"""Run by torchrun from test_evaluator.py: each rank feeds its own (uneven) slice of a fixed
prediction set to ScenarioTaskMetrics; rank 0 writes the synced result as JSON."""
import json
import sys

import torch.distributed as dist

from msrec_dist.metrics.evaluator import ScenarioTaskMetrics
from tests.metrics.test_evaluator import SCENARIOS, TASKS, fake_predictions, rank_slices

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
logits, labels, scenario = fake_predictions()
metrics = ScenarioTaskMetrics(SCENARIOS, TASKS)
for lo, hi in rank_slices(len(labels), world)[rank]:
    metrics.update(logits[lo:hi], labels[lo:hi], scenario[lo:hi])
result = metrics.compute()
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
