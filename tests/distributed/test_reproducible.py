"""Same config + seed → the same metrics on CPU (two runs in this process, world of one)."""
from msrec_dist.config import load_experiment
from msrec_dist.distributed.context import init_distributed
from msrec_dist.training.runner import run
from tests.distributed.launch import TINY_MODEL, auc_cells


def test_same_seed_same_metrics(synth_data, tmp_path):
    results = []
    for i in range(2):
        cfg = load_experiment("configs/msrec_full.yaml", synth_data,
                              tuple(TINY_MODEL) + (f"run.dir={tmp_path / str(i)}", "train.max_steps=15"))
        results.append(run(cfg, init_distributed()))
    assert auc_cells(results[0]) == auc_cells(results[1])
    assert results[0]["steps"] == 15
