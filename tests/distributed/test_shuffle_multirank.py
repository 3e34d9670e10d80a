"""reader.shuffle on 2 gloo ranks (torchrun): every row once per epoch over the ranks, in a new
order each epoch; SIGKILL mid-epoch + resume trains the uninterrupted run's rows (same losses)."""
import os

import pytest

from msrec_dist.data.synth import generate
from tests.distributed.launch import auc_cells, errors, losses, metrics, train, train_and_kill

pytestmark = pytest.mark.dist
ROWS, B = 8_000, 256  # 2 ranks x 256: 16 steps per epoch, the last global batch 320 rows (256 + 64)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return generate(str(tmp_path_factory.mktemp("shuffle_data")), rows=ROWS, shards=4, seed=1, eval_rows=1_000,
                    users=500, items=300)


def rank_rows(run_dir: str, rank: int) -> list[int]:
    with open(os.path.join(run_dir, f"rows_rank{rank}.txt")) as f:
        return [int(x) for x in f.read().split()]


def per_epoch(rank: int) -> int:
    """Rows rank `rank` trains per epoch (interleave: its slice of each global batch)."""
    gb = 2 * B
    return sum(min(B, max(0, ROWS - k * gb - rank * B)) for k in range(-(-ROWS // gb)))


def test_two_ranks_every_row_once_per_epoch_new_order(data, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = train(2, data, run_dir, [f"reader.batch_size={B}", "train.epochs=2", "run.record_rows=true"])
    assert proc.returncode == 0, errors(proc)
    epochs = [[], []]
    for rank in (0, 1):
        rows, n = rank_rows(run_dir, rank), per_epoch(rank)
        assert len(rows) == 2 * n
        epochs[0] += rows[:n]
        epochs[1] += rows[n:]
    for rows in epochs:
        assert sorted(rows) == list(range(ROWS))
    assert epochs[0] != epochs[1]
    assert rank_rows(run_dir, 0)[:B] != list(range(B))  # not file order


def test_sigkill_mid_epoch_then_resume_trains_the_same_rows(data, tmp_path):
    """Checkpoints every 6 steps (mid-epoch); killed after step 18 (epoch 1, row 1024 of its shuffled
    order), resumed: the remaining losses and the final metrics are the uninterrupted run's, bit for bit."""
    sets = [f"reader.batch_size={B}", "train.epochs=3", "train.max_steps=40", "train.checkpoint_every=6",
            "train.keep_checkpoints=10"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    proc = train(2, data, full, sets)
    assert proc.returncode == 0, errors(proc)
    assert train_and_kill(2, data, killed, sets, kill_when=os.path.join(killed, "checkpoints", "step_18")), \
        "the run ended before it could be killed"
    proc = train(2, data, killed, sets, resume=True)
    assert proc.returncode == 0, errors(proc)
    step = int(next(ln for ln in (proc.stdout + proc.stderr).splitlines() if "resumed from" in ln).rsplit(" ", 1)[1])
    assert 18 <= step < 40 and step % 16 != 0  # resumed mid-epoch
    assert losses(killed)[-(40 - step):] == losses(full)[step:]
    assert auc_cells(metrics(killed)) == auc_cells(metrics(full))
