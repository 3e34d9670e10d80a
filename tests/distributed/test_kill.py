"""SIGKILL at random moments, several times in one run, each followed by --resume: the finished
run's losses (train_log.jsonl, each step once) and final metrics are the uninterrupted run's, bit
for bit (one rank: the bitwise case of test_multirank.py's single kill)."""
import json
import os
import random

import pytest

from msrec_dist.data.synth import generate
from tests.distributed.launch import auc_cells, errors, losses, metrics, train, train_and_kill

STEPS = 40
SETS = ["train.checkpoint_every=4", f"train.max_steps={STEPS}", "train.epochs=3", "reader.batch_size=512"]


def logged_steps(run_dir: str) -> int:
    try:
        with open(os.path.join(run_dir, "train_log.jsonl")) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def start_and_kill(data: str, run_dir: str, resume: bool, rng: random.Random) -> bool:
    """Start (or resume) the run; SIGKILL it a random moment after it logged a random step; True if
    killed, False if it finished first."""
    target = logged_steps(run_dir) + rng.randint(1, 8)
    return train_and_kill(1, data, run_dir, SETS, lambda: logged_steps(run_dir) >= target, resume=resume,
                          delay=rng.uniform(0, 0.3))


@pytest.mark.slow
@pytest.mark.dist
def test_random_sigkills_then_resume_match_an_uninterrupted_run(tmp_path):
    data = generate(str(tmp_path / "d"), rows=8_000, shards=4, seed=1, eval_rows=2_000, users=500, items=300)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    proc = train(1, data, full, SETS)
    assert proc.returncode == 0, errors(proc)
    rng = random.Random(int(os.environ.get("KILL_SEED", "0")))
    kills = 0
    for i in range(4):
        kills += start_and_kill(data, killed, resume=i > 0, rng=rng)
    assert kills >= 2, "the run ended before it could be killed twice"
    proc = train(1, data, killed, SETS, resume=True)
    assert proc.returncode == 0, errors(proc)
    assert losses(killed) == losses(full)  # each step once, the same values
    with open(os.path.join(killed, "train_log.jsonl")) as f:
        assert [e["step"] for e in map(json.loads, f) if "loss" in e] == list(range(1, STEPS + 1))
    assert metrics(killed)["steps"] == STEPS
    assert auc_cells(metrics(killed)) == auc_cells(metrics(full))
    assert metrics(killed)["train_samples"] == metrics(full)["train_samples"]
